"""``python -m fed``: the configuration reference of docs/configuration.md (the registered methods and
every configuration key with its default and meaning), generated from the code."""
import fed
from utils.config import schema_markdown


def methods_markdown() -> str:
    rows = ["| method | file | models | warm-up | what crosses |", "|---|---|---|---|---|"]
    for name in sorted(fed.METHODS):
        m = fed.METHODS[name]
        file = m.__module__.replace(".", "/") + ".py"
        kind = "one shared model (homogeneous)" if m.shared_model else "one model per client (heterogeneous)"
        sends = f"up: {m.sends['up']}; down: {m.sends['down']}"
        rows.append(f"| `{name}` | `{file}` | {kind} | {'yes' if m.uses_warmup else 'no'} | {sends} |")
    return "\n".join(rows)


def reference() -> str:
    return "### Methods\n\n" + methods_markdown() + "\n\n### Keys\n\n" + schema_markdown() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
