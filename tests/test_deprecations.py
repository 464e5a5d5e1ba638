"""The helpers that keep renamed and moved names working for one release, and the old module paths."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

from medsegdiff_monai.utils import DeprecatedNameWarning, renamed_args, renamed_key


def test_renamed_key_reads_the_old_key_only_when_it_is_set():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert renamed_key(None, True, "use_cls_head", "use_grade_head") is True
    with pytest.warns(DeprecationWarning, match="'use_cls_head' is renamed 'use_grade_head'"):
        assert renamed_key("false", True, "use_cls_head", "use_grade_head") == "false"
    with pytest.warns(DeprecationWarning):
        assert renamed_key(False, True, "use_cls_head", "use_grade_head") is False


def test_renamed_args_accepts_the_old_keyword():
    @renamed_args(old_name="new_name")
    def scale(value, new_name=2):
        return value * new_name

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scale(3) == 6 and scale(3, new_name=4) == 12 and scale(3, 5) == 15
    with pytest.warns(DeprecationWarning, match="old_name= of .*scale is renamed new_name="):
        assert scale(3, old_name=4) == 12
    with pytest.warns(DeprecationWarning, match="Both were given: the value of old_name= is used"):
        assert scale(3, old_name=4, new_name=5) == 12  # a config's new key, a user's override of the old one


def test_the_warnings_are_shown_by_default():
    """Python hides a plain DeprecationWarning raised outside ``__main__``, e.g. in the expression of a bundle config
    (``monai.bundle run`` evaluates it in a namespace of its own): these are shown."""
    assert issubclass(DeprecatedNameWarning, DeprecationWarning)
    code = (
        "import medsegdiff_monai.utils as utils; "
        "exec(\"utils.renamed_key(False, True, 'use_cls_head', 'use_grade_head')\", {'utils': utils})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "DeprecatedNameWarning: the config key 'use_cls_head' is renamed 'use_grade_head'" in result.stderr


MOVED_MODULES = [
    ("medsegdiff_monai.inferers.checkpoint", "medsegdiff_monai.networks.checkpoint", "load_network_weights"),
    ("medsegdiff_monai.inferers.evaluation", "medsegdiff_monai.workflows.evaluation", "run_evaluation"),
    ("medsegdiff_monai.inferers.export", "medsegdiff_monai.workflows.export", "export_network"),
    ("medsegdiff_monai.inferers.inputs", "medsegdiff_monai.workflows.inputs", "resolve_entries"),
    ("medsegdiff_monai.inferers.pipeline", "medsegdiff_monai.workflows.pipeline", "BratsVolumeInferer"),
    ("medsegdiff_monai.inferers.writers", "medsegdiff_monai.workflows.writers", "write_grades_csv"),
    (
        "medsegdiff_monai.networks.diffusion_unet_cls",
        "medsegdiff_monai.networks.diffusion_unet_grade",
        "ConditionFeatures",
    ),
]


@pytest.mark.parametrize("old, new, name", MOVED_MODULES)
def test_old_module_path_imports_the_moved_module_with_a_warning(monkeypatch, old, new, name):
    monkeypatch.delitem(sys.modules, old, raising=False)  # import it afresh
    with pytest.warns(DeprecationWarning, match=rf"module {old} moved to {new}") as caught:
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert "medsegdiff_monai" not in caught[0].filename  # it points at the import, not at the library
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_old_module_path_from_import(monkeypatch):
    monkeypatch.delitem(sys.modules, "medsegdiff_monai.inferers.export", raising=False)
    with pytest.warns(DeprecationWarning, match="medsegdiff_monai.workflows.export"):
        from medsegdiff_monai.inferers.export import load_exported_network
    from medsegdiff_monai.workflows import load_exported_network as moved

    assert load_exported_network is moved


def test_old_network_class_name():
    import medsegdiff_monai.networks as networks
    from medsegdiff_monai.networks.diffusion_unet_grade import DiffusionUNetWithGradeHead

    with pytest.warns(DeprecationWarning, match="DiffusionUNetWithClsHead is renamed .*DiffusionUNetWithGradeHead"):
        assert networks.DiffusionUNetWithClsHead is DiffusionUNetWithGradeHead
    with pytest.warns(DeprecationWarning, match="DiffusionUNetWithClsHead"):
        from medsegdiff_monai.networks.diffusion_unet_grade import DiffusionUNetWithClsHead
    assert DiffusionUNetWithClsHead is DiffusionUNetWithGradeHead
    with pytest.raises(AttributeError, match="no attribute 'NotANetwork'"):
        networks.NotANetwork  # noqa: B018
