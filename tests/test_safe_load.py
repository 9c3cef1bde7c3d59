"""The weights-only loader of the training job: an enum member pickled by name (Python 3.11.0-3.11.4,
e.g. Debian bookworm's 3.11.2) loads; getattr on anything else is refused."""
import pytest
import torch

from moga_dist.train.safe_load import safe_load, unsafe_reason

deepspeed = pytest.importorskip("deepspeed")


class _ByName:
    """Pickles as getattr(cls, name), as Enum.__reduce_ex__ did in Python 3.11.0-3.11.4."""

    def __init__(self, cls, name):
        self.cls, self.name = cls, name

    def __reduce__(self):
        return getattr, (self.cls, self.name)


def test_an_enum_member_pickled_by_name_loads(tmp_path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"stage": _ByName(ZeroStageEnum, "gradients")}, tmp_path / "ok.pt")
    assert safe_load(tmp_path / "ok.pt")["stage"] is ZeroStageEnum.gradients


@pytest.mark.parametrize("target", ["loss_scaler_init", "enum_dunder"])
def test_getattr_on_anything_else_is_refused(tmp_path, target):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    cls, name = (LossScaler, "__init__") if target == "loss_scaler_init" else (ZeroStageEnum, "__class__")
    torch.save({"x": _ByName(cls, name)}, tmp_path / "bad.pt")
    assert unsafe_reason(tmp_path / "bad.pt") is not None
