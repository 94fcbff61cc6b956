"""Registering a folder of NIfTI files: the dataset and the evaluator of ``configs/inference.yaml``.

:class:`RegistrationDataset` lists the cases (folder mode: every ``.nii``/``.nii.gz`` of ``IN_DIR``; pairs mode: a
CSV) and preprocesses each; :class:`RegistrationEvaluator` registers each moving image to its fixed image;
:class:`scripts.case_outputs.RegistrationWriter` writes the results; :func:`run_registration` runs it all with the
command line's exit codes.

Failures and reruns:

* A bad input never stops the folder: it gets status ``error`` and a one-line message naming the file, and the
  next input is registered.
* Case names name folders of OUT_DIR, so they are checked (:mod:`scripts.output_folder`): one path component, not
  hidden, not a file of the run such as ``summary.csv``; an invalid name is an ``error`` row naming the input, and
  every path the writer creates goes through one guard that keeps it inside OUT_DIR. One run at a time writes to a
  folder (``OUT_DIR/.keymorph.lock``); a second one is refused with one line naming the PID of the first.
* A case is done when ``OUT_DIR/NAME`` holds every output file (:func:`scripts.case_outputs.case_done`, including
  ``registered_EXTRA``) and its ``provenance.json`` (:mod:`scripts.provenance`) matches what the run would record
  now (fixed, moving, mask and accompanying files, weights, result-changing settings). Done cases are skipped
  without being preprocessed, and keep their summary row (the one their folder records, else the earlier
  ``summary.csv``'s: :mod:`scripts.case_outputs`), unless ``overwrite`` is set; cases recorded
  otherwise are redone, their row saying what changed. Failed cases have no folder, so a rerun retries them.
* Hidden NIfTI files, MGH/MGZ and Analyze/NIfTI-pair files of the input folder are not read; each gets a
  ``skipped`` row saying why (:func:`not_read_reason`).

Throughput: with ``num_workers`` > 0 the dataset's preprocessing (reading, skull stripping, the brain frame: the
slow part with deepbet) runs in DataLoader worker processes, each preparing one case at a time and holding at
most one ready (``prefetch_factor`` 1), in the order of the list; the main process registers and writes. Each process
has one thread and the main process the rest of the cores (:func:`main_process_threads`). The fixed image is preprocessed once per run
(:meth:`RegistrationEvaluator.fixed`), and nothing of a case is kept once its row is written, so memory does not
grow with the folder.

Under ``torchrun`` (``configs/multi_gpu_inference.yaml``) each process registers every N-th case of the same list
(its sampler) and the writers of all ranks merge their rows (:mod:`scripts.case_outputs`);
:func:`register_cases` and :func:`exit_if_failed` are then two steps, so the process group ends between them.
"""

from __future__ import annotations

import contextlib
import csv
import fnmatch
import functools
import glob
import logging
import os
import sys
import time

import torch
from ignite.engine import Engine, Events
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.transforms import apply_transform

from scripts.case_outputs import FIXED_IMAGES_KEPT, case_done, extra_output_names, source_path
from scripts.cli import as_bool, optional
from scripts.errors import KeyMorphInputError, fail, first_line, message_naming, printable, worker_died, workflow_step
from scripts.image_io import is_nifti, nifti_stem
from scripts.output_folder import SUMMARY_FILE, check_case_name
from scripts.provenance import SUMMARY_ROW_KEY, read_provenance, what_changed

logger = logging.getLogger(__name__)


def not_read_reason(file_name: str) -> str | None:
    """Why an image file of the input folder is listed with a ``skipped`` row instead of being registered, or None
    for the files registered (and for other files, which are not images)."""
    lower = file_name.lower()
    if is_nifti(lower) and file_name.startswith("."):
        return "hidden file (its name starts with '.'), not registered; rename it to register it"
    if lower.endswith((".mgz", ".mgh")):
        return "FreeSurfer MGH/MGZ is not read (ITK tools cannot read it); convert it, e.g. `mri_convert IN.mgz OUT.nii.gz`"
    if lower.endswith((".hdr", ".hdr.gz")):
        return (
            "Analyze / NIfTI-pair (.hdr/.img) is not read (Analyze headers carry no orientation); convert it to one"
            " .nii.gz, e.g. `fslchfiletype NIFTI_GZ IN.hdr`"
        )
    return None


class RegistrationDataset(Dataset):
    """The cases to register, one dict per moving image: ``{"name", "image", "fixed", "extra"}``.

    Folder mode: every ``.nii``/``.nii.gz`` directly in ``dataset_dir`` is a moving image registered to
    ``fixed_image``; ``apply_to`` (a glob relative to ``dataset_dir`` with ``{name}`` standing for the case name, e.g.
    ``"labels/{name}_seg.nii.gz"``) names accompanying images the transform is also applied to; files it matches are
    not moving images themselves. Pairs mode: ``pairs_csv`` with columns ``moving``, ``fixed`` and optionally
    ``name`` and ``extra`` (paths separated by ``;``); relative paths are relative to the CSV.

    Case names must be unique (they name the output folders): a second input with the same name (``a.nii`` next to
    ``a.nii.gz``, or the same moving image in two rows of a pairs CSV without a ``name`` column) becomes an error
    item saying so.

    ``mask_dir`` (for ``--skull_strip mask``): the brain mask of ``NAME.nii.gz`` is ``mask_dir/NAME.nii.gz`` (or
    ``.nii``), given to the preprocessing as ``mask_path``.

    With ``output_dir`` given and ``overwrite`` false, cases already done there (:func:`case_done`) come back as
    ``{..., "skipped": True}`` without being read, with the summary row their folder's record holds
    (:data:`scripts.provenance.SUMMARY_ROW_KEY`, None when it holds none: the record is read once, here), unless
    ``provenance`` (a :class:`scripts.provenance.RunProvenance`) shows that they were made from other files,
    settings or weights: those are redone, with a note saying what changed. Items carry the record the writer stores
    (``"provenance"``). Items whose preprocessing fails come back as ``{..., "error": message}`` so one bad file
    never stops the folder.
    """

    def __init__(
        self,
        dataset_dir: str,
        fixed_image: str,
        transform=None,
        pairs_csv: str | None = None,
        apply_to: str | None = None,
        mask_dir: str | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
        provenance=None,
    ):
        pairs_csv, apply_to, mask_dir = optional(pairs_csv), optional(apply_to), optional(mask_dir)
        self.provenance = provenance
        items = self._pairs(pairs_csv) if pairs_csv else self._folder(dataset_dir, fixed_image, apply_to)
        seen: dict[str, str] = {}
        for item in items:
            if "not_read" in item:
                continue
            try:
                check_case_name(item["name"], item["image"])
            except KeyMorphInputError as error:
                item["error"], item["name"] = str(error), printable(str(item["name"]))
                continue
            if mask_dir:
                item["mask_path"] = self._mask_path(mask_dir, item["name"])
            item["extra"] = list(dict.fromkeys(os.path.normpath(p) for p in item["extra"]))
            try:
                extra_output_names(item["extra"])
            except KeyMorphInputError as error:
                item["error"] = f"{item['image']}: {error}"
            if item["name"] in seen:
                item["error"] = (
                    f"{item['image']}: case name {item['name']!r} is already used by {seen[item['name']]};"
                    " rename one of them (or give a 'name' column in the pairs CSV)"
                )
            else:
                seen[item["name"]] = item["image"]
        self.output_dir, self.overwrite = output_dir, as_bool(overwrite, "overwrite")
        super().__init__(data=items, transform=transform)

    @staticmethod
    def _mask_path(mask_dir: str, name: str) -> str:
        for suffix in (".nii.gz", ".nii"):
            if os.path.exists(os.path.join(mask_dir, name + suffix)):
                return os.path.join(mask_dir, name + suffix)
        return os.path.join(mask_dir, name + ".nii.gz")  # missing: the mask backend names it in its error

    @staticmethod
    def _folder(dataset_dir: str, fixed_image: str, apply_to: str | None) -> list[dict]:
        if not os.path.isdir(dataset_dir):
            raise KeyMorphInputError(f"{dataset_dir}: input folder not found")
        files = sorted(os.listdir(dataset_dir))
        names = [n for n in files if is_nifti(n) and not_read_reason(n) is None]
        not_read = [
            {"name": n, "image": os.path.join(dataset_dir, n), "fixed": fixed_image, "extra": [], "not_read": reason}
            for n in files
            for reason in [not_read_reason(n)]
            if reason
        ]
        if apply_to:
            pattern = apply_to.replace("{name}", "*")
            names = [n for n in names if not fnmatch.fnmatch(n, pattern)]
        items = []
        for name in names:
            stem = nifti_stem(name)
            item = {"name": stem, "image": os.path.join(dataset_dir, name), "fixed": fixed_image, "extra": []}
            if apply_to:
                item["extra"] = sorted(glob.glob(os.path.join(dataset_dir, apply_to.replace("{name}", stem))))
                if not item["extra"]:
                    item["notes"] = [f"--apply_to {apply_to!r} matched no file for this case"]
            items.append(item)
        if not items:
            other = f" ({not_read[0]['name']}: {not_read[0]['not_read']})" if not_read else ""
            raise KeyMorphInputError(f"{dataset_dir}: no .nii or .nii.gz files to register{other}")
        return items + not_read

    @staticmethod
    def _pairs(pairs_csv: str) -> list[dict]:
        if not os.path.isfile(pairs_csv):
            raise KeyMorphInputError(f"{pairs_csv}: pairs CSV not found")
        root = os.path.dirname(os.path.abspath(pairs_csv))
        try:
            with open(pairs_csv, newline="", encoding="utf-8-sig") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            raise KeyMorphInputError(f"{pairs_csv}: cannot read the pairs CSV ({first_line(error)})") from None
        if not rows or not {"moving", "fixed"} <= set(rows[0]):
            raise KeyMorphInputError(f"{pairs_csv}: needs a header with the columns 'moving' and 'fixed'")
        items = []
        for number, row in enumerate(rows, start=2):
            if not (row.get("moving") or "").strip() or not (row.get("fixed") or "").strip():
                raise KeyMorphInputError(f"{pairs_csv}: line {number} has no 'moving' or no 'fixed' path")
            moving = os.path.join(root, row["moving"].strip())
            extra = [os.path.join(root, p.strip()) for p in (row.get("extra") or "").split(";") if p.strip()]
            items.append(
                {
                    "name": (row.get("name") or "").strip() or nifti_stem(moving),
                    "image": moving,
                    "fixed": os.path.join(root, row["fixed"].strip()),
                    "extra": extra,
                }
            )
        return items

    def _transform(self, index: int):
        item = dict(self.data[index])
        if "error" in item:
            return {**item, "seconds": 0.0}
        if "not_read" in item:
            return {**item, "skipped": True, "seconds": 0.0}
        start = time.perf_counter()
        if self.provenance is not None:
            item["provenance"] = self.provenance.for_case(item)
        if self.output_dir and not self.overwrite and case_done(self.output_dir, item["name"], item["extra"]):
            # read once: compared here, and its summary row goes along to the writer of a skipped case
            record = read_provenance(os.path.join(self.output_dir, item["name"]))
            change = what_changed(record, item["provenance"]) if self.provenance is not None else None
            if change is None:
                return {**item, "skipped": True, "seconds": 0.0, SUMMARY_ROW_KEY: (record or {}).get(SUMMARY_ROW_KEY)}
            item["notes"] = [*item.get("notes", []), f"redone: {change}"]
        try:
            result = apply_transform(self.transform, item) if self.transform is not None else item
        except Exception as error:  # KeyMorphInputError, or a library failing on a file we did not foresee
            result = {**item, "error": message_naming(error, item["image"])}
        return {**result, "seconds": time.perf_counter() - start}


class RegistrationEvaluator(SupervisedEvaluator):
    """Registers each moving image of the dataset to its fixed image; one iteration per case.

    The fixed images are preprocessed once with ``fixed_preprocessing`` and kept (the last
    :data:`scripts.case_outputs.FIXED_IMAGES_KEPT` of them; a fixed image that fails is an error for each of its
    cases). Which cases are skipped is the dataset's decision (items marked ``skipped``). The
    iteration output is a dict with ``name``, ``status`` ("ok", "error" or "skipped"; the writer turns "ok" into
    "suspect" when QC flags it), ``message``, ``seconds`` and, for registered cases, the
    :class:`scripts.registration.Registration` and the network-grid images for the writer.
    """

    def __init__(
        self,
        device,
        val_data_loader,
        network,
        inferer,
        fixed_preprocessing,
        output_dir: str,
        val_handlers=None,
        **kwargs,
    ):
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            inferer=inferer,
            val_handlers=val_handlers,
            **kwargs,
        )
        self.fixed_preprocessing = fixed_preprocessing
        self.output_dir = output_dir
        # each fixed image is preprocessed once per run (the last few are kept, see FIXED_IMAGES_KEPT)
        self._prepared_fixed = functools.lru_cache(maxsize=FIXED_IMAGES_KEPT)(self._prepare_fixed)

    def _prepare_fixed(self, path: str) -> dict | str:
        """The preprocessed fixed image, or the one-line message saying why it cannot be (kept as well, so a bad
        fixed image is read once, not once per case)."""
        try:
            return self.fixed_preprocessing({"image": path})
        except Exception as error:
            if worker_died(error):
                raise
            return f"fixed image {message_naming(error, path)}"

    def fixed(self, path: str) -> dict:
        """The preprocessed fixed image; raises :class:`KeyMorphInputError` (every time) when it cannot be."""
        prepared = self._prepared_fixed(path)
        if isinstance(prepared, str):
            raise KeyMorphInputError(prepared)
        return prepared

    def run(self) -> None:
        """Register the cases; with no case at all (a rank of a ``torchrun`` job with more ranks than cases) only
        start and complete, where the writer takes part in the other ranks' exchanges (MONAI skips empty runs)."""
        if len(self.data_loader) == 0:
            self.fire_event(Events.STARTED)
            self.fire_event(Events.COMPLETED)
            return
        super().run()

    def _iteration(self, engine: Engine, batchdata):
        item = batchdata[0]
        start = time.perf_counter() - item.get("seconds", 0.0)  # include the reading and preprocessing
        base = {"name": item["name"], "seconds": 0.0, "message": ""}
        if item.get("skipped"):
            message = item.get("not_read", "outputs exist (set --overwrite true to redo)")
            return {**base, "status": "skipped", "message": message, SUMMARY_ROW_KEY: item.get(SUMMARY_ROW_KEY)}
        if "error" in item:
            return {**base, "status": "error", "message": item["error"], "seconds": time.perf_counter() - start}
        try:
            fixed = self.fixed(item["fixed"])
            self.network.eval()
            with torch.no_grad():
                registration = self.inferer(
                    fixed["image"][None].to(engine.state.device),
                    item["image"][None].to(engine.state.device),
                    self.network,
                    fixed_mask=fixed["mask"][None].to(engine.state.device),
                    fixed_native=[fixed["native"].to(engine.state.device)] if "native" in fixed else None,
                    moving_native=[item["native"].to(engine.state.device)] if "native" in item else None,
                )
        except Exception as error:
            if worker_died(error):
                raise
            logger.debug("registration of %s failed", source_path(item), exc_info=True)
            message = message_naming(error, source_path(item))
            return {**base, "status": "error", "message": message, "seconds": time.perf_counter() - start}
        return {**base, "status": "ok", "registration": registration, "fixed": fixed, "moving": item, "start": start}


def main_process_threads(num_workers: int, num_threads: int | None = None) -> int:
    """Torch threads for the main process of a run (it registers and writes); each of its ``num_workers``
    preprocessing workers runs one thread (:data:`WORKER_THREADS`).

    ``num_threads`` when given; else ``OMP_NUM_THREADS`` when set (the user's choice, or torchrun's: it sets 1 for
    each of several processes); else the cores this process may run on, shared among the processes torchrun started
    on this machine (``LOCAL_WORLD_SIZE``), less one per worker, at least 1.

    Why not torch's default (every core, in every process): OpenMP threads that outnumber the cores wait for one
    another at every parallel step; on a 2-core machine shared with a training run, five small cases took 102 s with
    torch's default and 8.5 s with one thread per process.
    """
    if optional(num_threads) is not None:
        return int(num_threads)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes_here = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(1, cores // processes_here - int(num_workers))


#: Torch threads of a preprocessing worker. One, always: a worker is forked from the main process once that has run
#: its own threads, and OpenMP cannot start threads again in such a child: a worker given two hung at its first
#: parallel step (deepbet's first convolution), forever and without a message. One worker per case in flight is how
#: more cores speed up the preprocessing (``num_workers``).
WORKER_THREADS = 1


def start_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the inference DataLoader: the worker runs :data:`WORKER_THREADS` torch thread (torch's
    own default for DataLoader workers, made explicit here so that no later setting raises it)."""
    torch.set_num_threads(WORKER_THREADS)


@workflow_step
def run_registration(evaluator) -> None:
    """Run the inference evaluator; exit 1 when any input failed (saying how many), 2 on a bad setting."""
    register_cases(evaluator)
    exit_if_failed(evaluator)


@workflow_step
def register_cases(evaluator) -> None:
    """Run the inference evaluator; exit 2 when the run cannot start or end (the output folder taken or gone, a
    preprocessing worker killed)."""
    try:
        with one_line_if_a_worker_dies():
            evaluator.run()
    except KeyMorphInputError as error:
        fail(str(error))


@contextlib.contextmanager
def one_line_if_a_worker_dies():
    """Turn the death of a DataLoader worker (:func:`scripts.errors.worker_died`: most often the kernel ending it
    when memory ran out) into one line and exit code 2 instead of a traceback; the cases finished so far are kept."""
    try:
        yield
    except RuntimeError as error:
        if not worker_died(error):
            raise
        sys.stderr.write("\r")  # over the progress bar the run left unfinished, not after it on its line
        fail(
            f"{first_line(error)} (out of memory?); the cases finished so far are kept and the same command goes on"
            " from there; fewer preprocessing workers (--num_workers 1 or 0) need less memory"
        )


@workflow_step
def exit_if_failed(evaluator) -> None:
    """Exit 1 when any input of the run failed, saying how many (under ``torchrun``: of the whole job)."""
    counts = getattr(evaluator.state, "registration_counts", {})
    failed = counts.get("error", 0)
    if failed:
        summary = os.path.join(getattr(evaluator, "output_dir", "."), SUMMARY_FILE)
        fail(f"{failed} of {sum(counts.values())} input(s) failed; see {summary} for each message", code=1)
