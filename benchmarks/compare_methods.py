"""KeyMorph against ANTs and elastix on the robustness sweep's pairs, side by side: accuracy, seconds, memory.

Usage (from the bundle root)::

    python benchmarks/compare_methods.py --label_maps_dir ../shared/data/label_maps \\
        --subjects training_seg_13 training_seg_14 training_seg_15 training_seg_16 --output_dir docs/benchmark \\
        [--rotations 0 45 90 135 180] [--modality_pairs T1-T2 ...] [--pairs_per_cell 2] \\
        [--methods keymorph ants elastix] [--ckpt_path models/model.pt] [--refine_iterations K] [--include_mni] \\
        [--spacing 1.0] [--threads 2] [--work_dir DIR] [--keep_cases] [--retry_failed] [--quick]

Cases
-----
The cases of ``configs/evaluate.yaml`` (:mod:`scripts.evaluation`; its defaults are read from that file): for each
modality pair ``FIXED-MOVING``, pair index ``k`` and net initial rotation, a fixed and a moving image synthesized
from the held-out label maps with the preset contrasts, brain only (skull-stripped) and without deformation, at
``--spacing`` mm (1 mm). The moving image is moved by ``M = C(c) Tr(t) R(axis, angle) S(s) C(-c)`` (a rotation by
exactly ``angle`` about a random axis, with a random scale and translation, see :mod:`scripts.evaluation`) and
RESAMPLED onto a world-aligned grid, then cropped to its brain plus 10 mm. The first ``ceil(same_subject_fraction *
pairs_per_cell)`` pairs of a cell are same-subject pairs (one anatomy in two contrasts; the truth ``M`` is exact:
Dice and TRE), the others different-subject pairs (Dice only). Each case is written as NIfTI files
(``WORK_DIR/cases/<base>/fixed.nii.gz``, ``fixed_labels``, ``fixed_mask`` and ``<base>/r<angle>/moving.nii.gz``,
``moving_labels``, ``moving_mask``, ``case.json`` holding the true fixed-to-moving matrix; ``WORK_DIR`` defaults to
``~/.cache/keymorph/benchmark``, and a case's files are removed once every method has registered it unless
``--keep_cases``), and every method reads the two image files, as users do. Dice and TRE are scored exactly as in
the sweep (:func:`scripts.evaluation.score_case`: Dice on the fixed label map's own grid, TRE over the fixed brain
voxels).

``--include_mni`` adds TRE-only cases on the MNI152 2009 T1 template (``scripts.image_io.default_atlas_path()``),
one per modality pair whose fixed contrast is T1 and rotation: the real template is the fixed image; the moving
image is the template itself (``T1-T1``) or a T2/PD image synthesized from a three-class tissue map of the template
(k-means of its brain intensities: CSF, grey matter, white matter), moved and resampled like the others. The
template has no anatomical labels (a tissue map cut from its own intensities would score the contrast change, not
the anatomy), so these cases are scored by TRE only; their rows say ``dataset: mni152``.

Methods
-------
Every method returns the FIXED-to-MOVING world matrix in RAS mm (:mod:`scripts.coordinates`).

* ``keymorph``: the bundle's own path from files: ``preprocessing`` and ``fixed_preprocessing`` of
  ``configs/inference.yaml`` with ``skull_strip none`` (the inputs are brains), the network of ``network_def`` with
  ``--ckpt_path`` (:func:`scripts.bundle_api.load_state_dict`), the config's ``inferer`` with
  ``--refine_iterations`` (default: the config's), then the native-grid resampling and ``registered.nii.gz`` and
  ``transform.tfm`` as :class:`scripts.case_outputs.RegistrationWriter` writes them.
* ``ants``: ``ants.registration(fixed, moving, type_of_transform="Affine")`` with its defaults (centre-of-mass
  initialisation, Mattes mutual information). Its forward transform (``fwdtransforms[0]``, an ITK
  ``MatrixOffsetTransform`` .mat file in LPS with a centre) maps fixed points to moving points; it is read with
  SimpleITK and flipped to RAS (:func:`ras_from_ants`).
* ``elastix``: itk-elastix's default affine parameter map (``GetDefaultParameterMap("affine")``, Mattes mutual
  information, 4 resolutions). Its ``TransformParameters`` (a row-major 3x3 matrix ``A`` and a translation ``t``,
  LPS, fixed to moving) act as ``p -> A (p - c) + c + t`` about ``CenterOfRotationPoint`` ``c``
  (:func:`ras_from_elastix`). The result image is made by transformix from the same parameters (see Timing).
* ``identity`` (optional): no registration, the scores of the starting misalignment.

``tests/test_benchmark.py`` checks both conversions by registering an image to a copy of itself moved by a known
small transform.

Timing and memory
-----------------
Each method runs in its own worker process (started once, fed the cases one by one through a pipe) limited to
``--threads`` threads (``torch.set_num_threads``, ``OMP_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``),
after one untimed warm-up on a small phantom pair that loads every library and kernel. Per pair:

* ``seconds_compute``: KeyMorph: the network on both network-grid images, the fit (and refinement) and the warp of
  the moving image on the network grid. ANTs: the ``ants.registration`` call (which also resamples both images
  onto each other's grids). elastix: the ``elastix_registration_method`` call with ``WriteResultImage false``.
* ``seconds_end_to_end``: reading both files, the preprocessing, the registration, the moving image resampled onto
  the fixed image's native grid and written as ``registered.nii.gz``, and the transform written (KeyMorph:
  ``transform.tfm``; ANTs: its .mat; elastix: ``TransformParameters.0.txt``; elastix's resampling is transformix
  with the default order-3 B-spline). Process start and imports are excluded for every method alike.
* ``peak_rss_mb``: the worker's peak resident memory during the pair (``VmHWM`` of ``/proc/self/status``, reset
  before each pair through ``/proc/self/clear_refs``), libraries included.

KeyMorph's rows also hold its QC scores (``qc_residual_mm``, ``qc_similarity``: :func:`scripts.qc.qc_scores`, computed
inside the end-to-end time as the inference writer does), the data for calibrating the QC thresholds of
``configs/inference.yaml`` against the errors.

Outputs in ``--output_dir``: ``cases.csv`` (one row per case and method, ``benchmark_summary.COLUMNS``), ``summary.json``,
``summary.md`` (tables and the machine), ``dice_vs_rotation.png``, ``tre_vs_rotation.png``,
``seconds_per_pair.png`` and ``settings.json``. The run resumes: cases already in ``cases.csv`` are skipped (failed
ones too, unless ``--retry_failed``); a method whose settings changed (e.g. new weights) is redone; other changed
case settings stop the run. ``--quick`` is a smoke configuration: 2 mm, the first subject, rotations 0 and 90, the
first modality pair, one same-subject pair per cell, ANTs and elastix with few iterations.

The parts: ``benchmark_settings`` (the command line and the checks), ``benchmark_cases`` (the cases as files, the
scored rows), ``method_runners`` and ``method_workers`` (the methods in their processes), ``benchmark_summary`` and
``benchmark_report`` (statistics, tables and plots).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchmark_cases import build_datasets, case_ids, score_row, write_case, write_phantom_pair, write_text  # noqa
from benchmark_report import write_outputs  # noqa: E402
from benchmark_settings import (  # noqa: E402
    check_settings,
    machine_info,
    method_settings,
    parse_args,
    resolve_settings,
    worker_environment,
)
from benchmark_summary import read_rows, write_rows  # noqa: E402
from method_runners import IdentityRunner  # noqa: E402
from method_workers import Worker, worker_main  # noqa: E402

logger = logging.getLogger("compare_methods")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, json.loads(args.worker_settings or "{}"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from scripts.errors import fail

    settings = resolve_settings(args)
    label_maps = check_settings(settings, args)
    output_dir = os.path.abspath(args.output_dir)
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    work_dir = os.path.abspath(args.work_dir or os.path.join(cache, "keymorph", "benchmark"))
    for folder in (output_dir, work_dir):
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as error:
            fail(f"{folder}: cannot create the folder ({error.strerror})")
    methods = list(dict.fromkeys(args.methods))
    per_method = {m: method_settings(m, args) for m in methods}
    cases_settings = {k: v for k, v in settings.items() if k != "label_maps_dir"}
    cases_settings["label_maps"] = {s: os.path.basename(p) for s, p in sorted(label_maps.items())}

    # resume: earlier rows of the same cases and method settings are kept
    csv_path, settings_path = os.path.join(output_dir, "cases.csv"), os.path.join(output_dir, "settings.json")
    rows = read_rows(csv_path)
    earlier = {}
    if rows and os.path.isfile(settings_path):
        with open(settings_path) as handle:
            earlier = json.load(handle)
    if earlier and earlier.get("cases") != json.loads(json.dumps(cases_settings)):
        changed = sorted(
            k
            for k in set(earlier.get("cases", {})) | set(cases_settings)
            if earlier.get("cases", {}).get(k) != json.loads(json.dumps(cases_settings)).get(k)
        )
        fail(
            f"{output_dir} holds results of other case settings ({', '.join(changed)}); choose another --output_dir"
            " or remove its cases.csv"
        )
    method_record = dict(earlier.get("methods", {}))
    for method in methods:
        if method in method_record and method_record[method] != per_method[method]:
            dropped = sum(r["method"] == method for r in rows)
            logger.warning(
                f"{method}: its settings changed since the earlier run; its {dropped} earlier rows are redone"
            )
            rows = [r for r in rows if r["method"] != method]
        method_record[method] = per_method[method]
    if args.retry_failed:
        rows = [r for r in rows if r["status"] == "ok"]
    script = os.path.relpath(os.path.abspath(__file__), os.getcwd())
    command = " ".join(shlex.quote(a) for a in ["python", script, *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info(args.threads)
    # cases.csv may gather the rows of several runs (resumed or extended): each run is recorded
    runs = [*(earlier.get("runs", []) if rows else []), {"date": machine["date"], "command": command}]
    record = {"cases": cases_settings, "methods": method_record, "runs": runs}
    write_text(settings_path, json.dumps(record, indent=2) + "\n")
    done = {(r["case"], r["method"]) for r in rows}
    meta = {"command": command, "machine": machine, "settings": record}
    datasets = build_datasets(settings, label_maps)
    tasks = []  # (dataset name, dataset, index, case id, base id, pending methods)
    for name, dataset in datasets:
        for index, (pair, k, angle) in enumerate(dataset.cases):
            base, case = case_ids(name, pair, k, angle)
            pending = [m for m in methods if (case, m) not in done]
            if pending:
                tasks.append((name, dataset, index, case, base, pending))
    total = sum(len(t[-1]) for t in tasks)
    logger.info(f"{total} registrations to run ({len(rows)} done earlier); case images in {work_dir}")

    warmup = None if args.no_warmup else write_phantom_pair(os.path.join(work_dir, "warmup"))
    env = worker_environment(args.threads)
    workers = {}
    for method in methods:
        if method != "identity":
            worker_settings = {**per_method[method], "threads": args.threads, "warmup": warmup}
            log_path = os.path.join(work_dir, f"worker_{method}.log")
            workers[method] = Worker(method, worker_settings, env, log_path, args.timeout)
    identity = IdentityRunner()
    last_of_base = {t[4]: t[3] for t in tasks}
    written_bases: set[str] = set()
    from tqdm import tqdm

    try:
        with tqdm(total=total, desc="registrations", unit="pair") as progress:
            for name, dataset, index, case_id, base, pending in tasks:
                case = dataset[index]
                case["case_id"] = case_id
                base_dir = os.path.join(work_dir, "cases", base)
                case_dir = os.path.join(base_dir, f"r{case['rotation_deg']:g}")
                paths = write_case(case, base_dir, case_dir, write_fixed=base not in written_bases)
                written_bases.add(base)
                for method in pending:
                    progress.set_postfix_str(f"{method} {case_id}")
                    output = os.path.join(case_dir, method)
                    if method == "identity":
                        result = {**identity.run(paths["fixed"], paths["moving"], output), "error": None}
                    else:
                        result = workers[method].run(paths["fixed"], paths["moving"], output)
                    rows.append(score_row(case, name, method, result))
                    write_rows(csv_path, rows)
                    progress.update(1)
                    if not args.keep_cases:
                        shutil.rmtree(output, ignore_errors=True)
                if not args.keep_cases:
                    shutil.rmtree(case_dir, ignore_errors=True)
                    if last_of_base[base] == case_id:
                        shutil.rmtree(base_dir, ignore_errors=True)
                write_outputs(output_dir, rows, meta, plots=False)
    finally:
        for worker in workers.values():
            worker.close()
    write_rows(csv_path, rows)
    meta["machine"]["load average at end (1, 5, 15 min)"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    summary = write_outputs(output_dir, rows, meta)
    for check in summary["results"]["targets"]:
        logger.info(f"{'met' if check['met'] else 'NOT met'}: {check['target']} (value {check['value']})")
    logger.info(f"outputs in {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
