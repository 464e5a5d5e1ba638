"""``report_errors_briefly``: how a bundle run reports a bad setting, an interrupt and a bug."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    from medsegdiff_monai.data import report_errors_briefly

    report_errors_briefly("Run the same command again to resume.")

    def build(kind):
        if kind == "warning":
            import warnings

            warnings.warn("evaluation: no subject has a true grade; grade metrics skipped.", stacklevel=1)
            raise SystemExit(0)
        if kind == "bad":
            raise ValueError("roi_size=[50, 50]: expected multiples of 8; e.g. --roi_size [48, 48].")
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "interrupted_pool":  # Ctrl-C inside a worker pool, which raises its own error while handling it
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise IndexError("pop from an empty deque")
        raise TypeError("a bug")

    try:  # as MONAI's config parser wraps what fails while it builds a component
        build(sys.argv[1])
    except Exception as error:
        component = "medsegdiff_monai.networks.get_network"
        raise RuntimeError(f"Failed to instantiate component '{component}' with keywords: x") from error
    """
)


def _run(kind: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MEDSEGDIFF_TRACEBACK"} | env
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, kind], capture_output=True, text=True, timeout=120, env=environment
    )


def test_a_bad_setting_ends_with_its_message_where_it_was_raised_and_exit_code_1():
    result = _run("bad")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: roi_size=[50, 50]: expected multiples of 8; e.g. --roi_size [48, 48]."
    assert "ValueError in build" in lines[1]
    assert "while building medsegdiff_monai.networks.get_network" in lines[1]
    assert "MEDSEGDIFF_TRACEBACK=1" in lines[1]


def test_the_whole_traceback_on_request():
    result = _run("bad", MEDSEGDIFF_TRACEBACK="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "RuntimeError: Failed to instantiate" in result.stderr


def test_a_bug_keeps_its_traceback():
    result = _run("bug")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "TypeError: a bug" in result.stderr
    assert "error:" not in result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="exit status of an interrupted process is POSIX")
@pytest.mark.parametrize("kind", ["interrupt", "interrupted_pool"])
def test_ctrl_c_says_how_to_go_on_without_a_traceback(kind):
    result = _run(kind)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "interrupted. Run the same command again to resume."


def test_a_warning_is_one_line_without_its_source_line():
    result = _run("warning")
    assert result.returncode == 0
    assert re.fullmatch(
        r"warning: evaluation: no subject has a true grade; grade metrics skipped\. \(UserWarning, <string>:\d+\)",
        result.stderr.strip(),
    )
    full = _run("warning", MEDSEGDIFF_TRACEBACK="1")
    assert "UserWarning: evaluation: no subject" in full.stderr and "warning:" not in full.stderr
