"""The ``torchrun`` command line of the tests that run the bundle's workflows in several processes.

Such a test builds the python command one process would run (``[sys.executable, "-m", "monai.bundle", "run",
...]``) and hands it to :func:`torchrun_command`, which starts it as ``processes`` ranks on this machine alone, as
a user's ``torchrun --standalone --nnodes=1 --nproc_per_node=N -m monai.bundle run ...`` does (on CPU the
multi-process overlays choose the gloo backend).
"""

from __future__ import annotations


def torchrun_command(command: list[str], processes: int = 2) -> list[str]:
    """``command`` (``[python, *arguments]``) started by ``python -m torch.distributed.run`` as ``processes``
    ranks on one machine (a rendezvous of its own, ``--standalone``), each rank running ``python *arguments``."""
    python, *arguments = command
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={processes}",
        *arguments,
    ]
