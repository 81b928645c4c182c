"""pyproject.toml's lower bounds admit only versions the code runs on."""
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO


def _floor(package: str) -> Version:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in deps if Requirement(d).name == package)
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"{package} has no lower bound in pyproject.toml"
    return max(floors)


def test_scikit_learn_floor_has_group_kfold_shuffle():
    # The demographics probe's GroupKFold(shuffle=..., random_state=...) exists from scikit-learn 1.6 on; an
    # install resolved to 1.3-1.5 would fail there with a TypeError.
    assert _floor("scikit-learn") >= Version("1.6")
