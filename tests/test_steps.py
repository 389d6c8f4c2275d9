"""Steps are a method's own ``@step`` functions: names checked when the class is defined, protocols
that pass bound methods, and ``read_only`` derived from the marks and true of every step so marked."""
import pytest
import torch

import fed
import fed.core.calls
from conftest import run_tiny
from fed.core.method import RESERVED, Method, step
from fed.core.calls import PARTY_CALLS, call, step_name
from utils.io import snapshot

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reserved_names_are_refused_when_the_class_is_defined():
    for name in ("evaluate", "weights", "setup", "run_round"):
        with pytest.raises(TypeError, match=f"{name} can not be a step"):
            type("Bad", (Method,), {name: step(lambda self, party, msg: None)})
    assert set(PARTY_CALLS) <= RESERVED


def test_an_unmarked_override_of_a_step_is_refused():
    class A(Method):
        @step(read_only=True)
        def ask(self, party, msg):
            return 1

    with pytest.raises(TypeError, match=r"B.ask overrides the step A.ask without @step"):
        class B(A):  # noqa: F841
            def ask(self, party, msg):
                return 2

    class C(A):
        @step
        def ask(self, party, msg):
            return 3

    assert A.read_only == {"ask"} and C.steps == {"ask": {"read_only": False, "reply": None}} and C.read_only == frozenset()


def test_read_only_is_derived_from_the_marks():
    assert fed.METHODS["hssf"].read_only == {"predict_public", "grade_public", "teacher_logits"}
    assert fed.METHODS["lssl"].read_only == {"send_weights"}
    assert fed.METHODS["local"].read_only == frozenset()
    for m in fed.METHODS.values():
        assert m.read_only <= set(m.steps) and not set(m.steps) & RESERVED, m.name
        assert "local" in m.steps, m.name


def test_protocols_pass_steps_not_strings():
    m = fed.METHODS["hssf"](fed.load_config(None))
    assert step_name(m, m.fuse) == "fuse"
    for bad in ("fuse", m.run_round, fed.METHODS["lssl"](m.cfg).receive, print):
        with pytest.raises(TypeError, match="is not one of its steps"):
            step_name(m, bad)
    with pytest.raises(KeyError, match="neither a step of HSSF"):
        call(m, object(), "__init__", None, {})


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


#: variant -> (overrides, the read-only steps it runs)
VARIANTS = {
    "hssf": ([], {"predict_public"}), "hssf_grades_first": (["hssf.grades_first=true"], {"grade_public", "teacher_logits", "predict_public"}),
    "lssl": (["method=lssl"], {"send_weights"}), "mean_teacher": (["method=mean_teacher"], {"send_weights"}),
    "eln": (["method=eln", "eln.eln_rounds=1"], {"send_weights"}), "fedmd": (["method=fedmd"], {"predict_public"}),
    "ktpfl": (["method=ktpfl"], {"predict_public"}), "feddistill": (["method=feddistill"], {"class_logits"}),
    "fedproto": (["method=fedproto"], {"upload"}), "rhfl": (["method=rhfl"], {"soft_maps"}),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_read_only_steps_change_nothing_on_their_party(tmp_path, monkeypatch, variant):
    """Every call of a read-only step in a real run (3 rounds, 1 warm-up) leaves its party's whole
    state (model, optimizer, schedule, scaler, the method's extra state) as it found it: a Flower
    "query" may be answered by any copy of the site and is not committed."""
    real, seen = fed.core.calls.call, set()

    def checked(method, party, name, msg, kw):
        if name not in type(method).read_only:
            return real(method, party, name, msg, kw)
        before = snapshot(party.state_dict())
        out = real(method, party, name, msg, kw)
        assert _same(before, party.state_dict()), f"{method.name}.{name} changed {party.name}"
        seen.add(name)
        return out

    monkeypatch.setattr(fed.core.calls, "call", checked)
    overrides, expected = VARIANTS[variant]
    run_tiny(tmp_path, variant, *overrides, "train.rounds=3")
    assert seen == expected


def test_a_new_method_is_one_class(tmp_path):
    """A method defined anywhere (here: in a test) with @register, its options and its steps runs with
    nothing else edited: its section is in the schema, its name is a valid `method`, the run uses it."""
    import utils.config as C
    from fed.common.epochs import local_epochs
    from fed.core.registry import METHODS, register
    from utils.config import Key, non_negative

    @register
    class PublicTwice(Method):
        name = "public_twice"
        options = {"passes": Key(2, int, "passes over D_p per round", check=non_negative)}

        def run_round(self, r, rnd):
            with r.phase("local"):
                r.clients(self.train_public, rnd=rnd)

        @step
        def train_public(self, client, msg, rnd):
            local_epochs(client, rnd, self.cfg.public_twice.passes, self.cfg.hssf, labeled="public")

    try:
        assert C.SCHEMA["public_twice"] is PublicTwice.options
        with pytest.raises(C.ConfigError, match="public_twice.passes: must be >= 0"):
            fed.load_config(None, ["method=public_twice", "public_twice.passes=-1"])
        _, res = run_tiny(tmp_path, "twice", "method=public_twice", "public_twice.passes=1", "train.rounds=1")
        assert res["rounds"] == 1 and 0 <= res["test"]["all"]["dice"]["mean"] <= 100
    finally:
        del METHODS["public_twice"], C.SCHEMA["public_twice"]
