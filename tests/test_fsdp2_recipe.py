"""docs/fsdp2.md's torchtitan-style recipe (FSDP2 x TP with MOGA), run as written with torchrun
on 4 CPU ranks: it trains, MOGA steps every DTensor parameter, and it writes a DCP checkpoint."""
import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "fsdp2.md"


def recipe_source() -> str:
    """The python block that follows the `<!-- recipe: fsdp2_tp_moga.py -->` marker."""
    match = re.search(r"<!-- recipe: fsdp2_tp_moga.py -->\n```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, f"no recipe block in {DOC}"
    return match.group(1)


def test_fsdp2_tp_recipe_runs_moga_on_every_parameter(tmp_path):
    script = tmp_path / "fsdp2_tp_moga.py"
    script.write_text(recipe_source())
    env = {**os.environ, "CKPT": str(tmp_path / "ckpt"), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
                           str(script)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stepped = re.search(r"MOGA stepped (\d+)/(\d+) DTensor parameters 3 times", proc.stdout)
    assert stepped and stepped.group(1) == stepped.group(2), proc.stdout
    assert (tmp_path / "ckpt" / ".metadata").is_file()
