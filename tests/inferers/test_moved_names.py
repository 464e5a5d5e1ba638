"""Names that moved out of ``medsegdiff_monai.inferers`` still resolve there for one release, with a warning."""

from __future__ import annotations

import pytest

import medsegdiff_monai.inferers as inferers
import medsegdiff_monai.networks as networks
import medsegdiff_monai.visualize as visualize
import medsegdiff_monai.workflows as workflows


@pytest.mark.parametrize(
    ("name", "package"),
    [
        ("run_evaluation", workflows),
        ("export_network", workflows),
        ("load_exported_network", workflows),
        ("ExportedDiffusionNetwork", workflows),
        ("collect_inference_inputs", workflows),
        ("check_inference_inputs", workflows),
        ("resolve_entries", workflows),
        ("BratsVolumeInferer", workflows),
        ("check_inference_run", workflows),
        ("write_png", visualize),
        ("label_overlay", visualize),
        ("load_network_weights", networks),
        ("extract_network_state", networks),
    ],
)
def test_old_name_warns_and_returns_the_moved_object(name, package):
    with pytest.warns(DeprecationWarning, match=rf"medsegdiff_monai\.inferers\.{name} moved to {package.__name__}"):
        moved = getattr(inferers, name)
    assert moved is getattr(package, name)


def test_old_from_import_warns():
    with pytest.warns(DeprecationWarning, match="medsegdiff_monai.workflows"):
        from medsegdiff_monai.inferers import run_evaluation
    assert run_evaluation is workflows.run_evaluation


def test_inferers_keep_their_own_names_without_warning(recwarn):
    assert inferers.DiffusionSampler.__module__ == "medsegdiff_monai.inferers.sampler"
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        inferers.not_a_name  # noqa: B018


def test_inferers_import_nothing_from_workflows():
    import subprocess
    import sys

    code = (
        "import sys, medsegdiff_monai.inferers; "
        "print(any(m.startswith('medsegdiff_monai.workflows') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
