"""The ``faceps`` command. Thin: it parses arguments and calls library functions.

Any :class:`~faceps.core.errors.FacepsError` prints one line on stderr and exits with
code 2 (the traceback only with ``--debug``); Ctrl-C exits with 130. Library functions
write outputs atomically, so an interrupted command leaves no partial file under a final
name.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from faceps import __version__
from faceps.core.errors import ConfigError, FacepsError
from faceps.core.memory import retain_freed_memory

log = logging.getLogger("faceps")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[[argparse.Namespace], int | None]


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        size = (int(w), int(h))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH such as 1600x1200; got '{text}'") from None
    if size[0] <= 0 or size[1] <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive; got '{text}'")
    return size


# ------------------------------------------------------------------ commands
#: the heavy libraries of the optimisation commands (a fresh import on the 2-core machine
#: of bench/RESULTS.md: torch 1.9 s, open3d 0.9 s)
SOLVER_MODULES = ("torch", "open3d")


#: heap bytes per working pixel that ``faceps reconstruct`` faults in ahead
#: (:func:`faceps.core.memory.prefault_heap`): a 1600x1200 reconstruction grows the
#: process by 1.07-1.30 GB past the session read (560-680 bytes per pixel, six sessions
#: of bench/RESULTS.md), so this stays below what it goes on to use
RECONSTRUCT_HEAP_PER_PIXEL = 500


def load_session_importing(session: str | os.PathLike,
                           modules: Sequence[str] = SOLVER_MODULES, *,
                           prefault: Callable[..., int] | None = None):
    """:func:`faceps.capture.load_session` in a worker thread while this thread imports
    ``modules``, which the command needs next anyway. Decoding the PNGs (OpenCV) and
    linearising them (numpy) release the GIL, so reading the session and importing the
    libraries overlap: a 1600x1200 session read and both libraries imported in 2.2 s
    instead of 2.55 s here. Errors of the session are raised as by ``load_session``.

    ``prefault(capture)``, when given, says how many bytes of heap the command will
    need; they are faulted in by a background thread from the moment the session is read
    (:func:`faceps.core.memory.prefault_heap`)."""
    import importlib
    from concurrent.futures import ThreadPoolExecutor

    from faceps.capture import load_session
    from faceps.core.memory import prefault_heap

    def load():
        capture = load_session(session)
        if prefault is not None:
            prefault_heap(prefault(capture))
        return capture

    with ThreadPoolExecutor(1, thread_name_prefix="faceps-load") as pool:
        loading = pool.submit(load)
        try:
            for name in modules:
                importlib.import_module(name)
        finally:
            capture = loading.result()
    return capture


def cmd_inspect(args: argparse.Namespace) -> int:
    from faceps.capture import inspect_session, load_session

    capture = load_session(args.session)
    sheet = args.out or os.path.join(str(capture.root), "contact_sheet.png")
    summary = inspect_session(capture, sheet)
    print(summary)
    print(f"contact sheet: {sheet}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from faceps.demo import run_demo

    result = run_demo(args.out, seed=args.seed, size=args.size, progress=not args.quiet)
    print(result.summary())
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from faceps.model import load_model

    model = load_model(args.model)
    print(model.describe())
    return 0


def cmd_model_preview(args: argparse.Namespace) -> int:
    from faceps.model import load_model
    from faceps.model.preview import preview_grid

    model = load_model(args.model)
    path = preview_grid(model, args.out, n=args.n, seed=args.seed, size=args.tile)
    print(f"wrote {path}")
    return 0


def cmd_model_import(args: argparse.Namespace) -> int:
    from faceps.model.importers import import_model

    model = import_model(args.kind, args.src, whole_head=args.whole_head)
    model.save(args.out)
    print(model.describe())
    print(f"wrote {args.out}")
    return 0


def _add_bumps_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bumps", type=float, default=0.0, metavar="MM",
                   help="off-model shape variation: smooth bumps and dents 6-25 mm across "
                   "on each face, amplitude drawn per face from 0-MM mm (default 0: off)")
    p.add_argument("--face-only", type=float, default=0.0, metavar="P",
                   help="probability that a face is rendered as its face region alone, "
                   "without the back of the head, ears and neck, as many morphable models "
                   "and scans look (default 0: whole heads)")
    p.add_argument("--id-scale", type=float, default=None, metavar="S",
                   help="identity spread: std of the identity coefficients in the model's "
                   "std units (default 1; wider draws reach faces further from the mean, "
                   "e.g. flatter ones than the built-in mean, see bench/RESULTS.md)")
    p.add_argument("--exp-scale", type=float, default=None, metavar="S",
                   help="expression strength: std of the expression coefficients in the "
                   "model's std units (default 0.7; 0: neutral faces)")
    p.add_argument("--exp-rms", type=float, default=None, metavar="MM",
                   help="expression strength as the mean RMS displacement of the face region "
                   "(mm) instead of --exp-scale, the same for any model (the built-in model "
                   "at the default --exp-scale: about 4.5 mm; a model of whole-emotion "
                   "blendshapes such as the Surrey model moves 2.7x as far at the same scale)")
    p.add_argument("--plain", type=float, default=0.0, metavar="P",
                   help="probability that a face has no fine detail (no wrinkles, folds, "
                   "roughness or pores; default 0)")
    p.add_argument("--flat-albedo", type=float, default=0.0, metavar="P",
                   help="probability that a face's albedo is one colour (no brows, lips or "
                   "blotches), as shape-only models are rendered (default 0)")
    p.add_argument("--smoothing", type=float, default=None, metavar="A",
                   help="Phong-tessellation shape factor of the subdivided face surface, "
                   "0-1: 0.5 curves the coarse model's triangles so that their flat facets "
                   "do not show at pixel scale (default 0: flat facets)")


def _face_config(args: argparse.Namespace):
    """The random-face ranges of ``faceps synth session|dataset`` (``--bumps``,
    ``--face-only``, ``--id-scale``, ``--exp-scale``, ``--exp-rms``, ``--plain``,
    ``--flat-albedo``, ``--smoothing``)."""
    from faceps.synth.detail import DetailConfig
    from faceps.synth.faces import FaceConfig

    if args.bumps < 0:
        raise ConfigError(f"--bumps must be >= 0 mm; got {args.bumps}")
    for flag, value in (("--face-only", args.face_only), ("--plain", args.plain),
                        ("--flat-albedo", args.flat_albedo)):
        if not 0 <= value <= 1:
            raise ConfigError(f"{flag} must be a probability in [0, 1]; got {value}")
    extra = {}
    if args.smoothing is not None:
        if not (math.isfinite(args.smoothing) and 0 <= args.smoothing <= 1):
            raise ConfigError(f"--smoothing must be in [0, 1]; got {args.smoothing}")
        extra["smoothing"] = float(args.smoothing)
    if args.exp_rms is not None and args.exp_scale is not None:
        raise ConfigError("give --exp-scale or --exp-rms, not both")
    for flag, name in (("--id-scale", "id_scale"), ("--exp-scale", "exp_scale"),
                       ("--exp-rms", "exp_rms")):
        value = getattr(args, name)
        if value is not None:
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{flag} must be a finite number >= 0; got {value}")
            extra["exp_rms_mm" if name == "exp_rms" else name] = float(value)
    return FaceConfig(detail=DetailConfig(bumps=(0.0, args.bumps)),
                      face_only_prob=args.face_only, plain_prob=args.plain,
                      flat_albedo_prob=args.flat_albedo, **extra)


def cmd_synth_session(args: argparse.Namespace) -> int:
    from faceps.model import load_model
    from faceps.synth.render import SensorConfig, ShadingConfig
    from faceps.synth.session import SessionSynthConfig, synth_session
    from faceps.synth.wild import WildConfig

    config = SessionSynthConfig(
        face=_face_config(args),
        size=args.size, n_lights=args.lights, landmark_noise_px=args.landmark_noise,
        encoding="srgb" if args.bit_depth == 8 else "linear", bit_depth=args.bit_depth,
        include_lights=not args.no_lights,
        shading=ShadingConfig(lambertian=args.lambertian),
        sensor=SensorConfig(full_well=0, read_noise=0) if args.no_noise else SensorConfig(),
        wild=WildConfig() if args.lighting == "wild" else None,
    )
    result = synth_session(args.out, seed=args.seed, model=load_model(args.model), config=config,
                           overwrite=args.force)
    what = "in-the-wild images" if config.wild is not None else "lights"
    print(f"wrote {result.path} ({config.size[0]}x{config.size[1]}, {config.n_lights} {what}) "
          f"in {result.timings['total']:.2f} s")
    return 0


def cmd_synth_dataset(args: argparse.Namespace) -> int:
    from faceps.datasets.build import DatasetConfig, build_dataset
    from faceps.synth.render import SensorConfig, ShadingConfig

    config = DatasetConfig(
        n_lights=args.lights, crop_scale=args.crop_scale,
        face=_face_config(args),
        shading=ShadingConfig(lambertian=args.lambertian),
        sensor=SensorConfig(full_well=0, read_noise=0) if args.no_noise else SensorConfig(),
        scans=tuple(args.scan or ()), scan_fraction=args.scan_fraction,
        lighting=args.lighting, wild_fraction=args.wild_fraction,
    )
    result = build_dataset(args.out, args.n, size=args.size, seed=args.seed,
                           workers=args.workers, shard_size=args.shard_size, model=args.model,
                           config=config, progress=not args.quiet, force=args.force,
                           executor=args.executor, ray_address=args.ray_address)
    print(result.summary())
    print(f"index: {result.index_json}")
    return 0


def cmd_dataset_info(args: argparse.Namespace) -> int:
    from faceps.datasets.info import dataset_info

    info = dataset_info(args.file, preview=args.preview, preview_samples=args.rows)
    print(info.text())
    if info.preview is not None:
        print(f"preview: {info.preview}")
    return 0


def cmd_synth_register(args: argparse.Namespace) -> int:
    from faceps.model import load_model
    from faceps.synth.register_io import register_and_export

    result = register_and_export(args.scan, load_model(args.model), args.out,
                                 landmarks=args.landmarks, scale=args.scale,
                                 region=args.region, name=args.name, progress=not args.quiet)
    print(result)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from faceps.model import load_model
    from faceps.optimize.fit import FitConfig, fit_session, write_fit

    capture = load_session_importing(args.session)
    model = load_model(args.model)
    config = FitConfig(landmarks=args.landmarks, calibrate=args.calibrate,
                       photometric=not args.no_photometric)
    result = fit_session(capture, model, config)
    files = write_fit(args.out, result, model, capture)
    print(f"proxy: landmark RMSE {result.proxy.landmark_rmse_px:.2f} px "
          f"({result.landmark_source} landmarks); lights: {result.lights_source}; "
          f"{sum(result.timings.values()):.2f} s")
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_build_dataset(args: argparse.Namespace) -> int:
    from faceps.datasets.real import run_from_args

    return run_from_args(args)


def cmd_reconstruct_batch(args: argparse.Namespace) -> int:
    from faceps.datasets.real import run_batch_from_args

    return run_batch_from_args(args)


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from faceps.model import load_model
    from faceps.optimize.fit import FitConfig
    from faceps.optimize.heightfield import HeightFieldConfig
    from faceps.optimize.normal_albedo import NormalAlbedoConfig
    from faceps.optimize.reconstruct import ReconstructConfig, reconstruct, write_reconstruction

    def heap(capture) -> int:
        scale = 1.0 if args.max_size is None else min(
            1.0, args.max_size / max(capture.width, capture.height))
        return int(RECONSTRUCT_HEAP_PER_PIXEL * capture.width * capture.height * scale**2)

    capture = load_session_importing(args.session, prefault=heap)
    model = load_model(args.model)
    na = NormalAlbedoConfig(domain=args.domain)
    if args.mu1 is not None:
        na = replace(na, mu1=args.mu1)
    if args.mu2 is not None:
        na = replace(na, mu2=args.mu2)
    if args.iterations is not None:
        na = replace(na, iterations=args.iterations)
    hf = HeightFieldConfig()
    if args.w1 is not None:
        hf = replace(hf, w1=args.w1)
    if args.w2 is not None:
        hf = replace(hf, w2=args.w2)
    if args.break_ratio is not None:
        hf = replace(hf, break_ratio=args.break_ratio)
    config = ReconstructConfig(
        fit=FitConfig(landmarks=args.landmarks, calibrate=args.calibrate),
        normal_albedo=na, height_field=hf, max_size=args.max_size,
        refine_passes=args.passes, region=args.region, distance=args.distance)
    stages = ["ingest", "proxy and lights", "proxy maps"] + (
        ["distance"] if args.distance != "off" else []) + [
        "normals and albedo", "height field"] * (1 + (args.passes if args.domain == "pixel"
                                                      else 0)) + ["resample"]
    with tqdm(total=len(stages), desc="reconstruct", unit="stage",
              disable=args.quiet or not sys.stderr.isatty()) as bar:
        def progress(name: str) -> None:
            if bar.n or name != "ingest":
                bar.update(1)
            bar.set_postfix_str(name)

        rec = reconstruct(capture, model, config, progress=progress)
        files = write_reconstruction(args.out, rec, model)
        bar.update(bar.total - bar.n)
    r = rec.report
    print(f"reconstructed {r['pixels']} pixels at {capture.width}x{capture.height} "
          f"(worked at {r['working_size'][0]}x{r['working_size'][1]}); lights: "
          f"{r['lights_source']}; {r['timings']['total']:.2f} s")
    if r.get("distance"):
        print(f"proxy distance scaled by {r['distance']['scale']:.4f} (photometric search)")
    for w in r["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from faceps.report import write_report

    path = write_report(args.out_dir, ground_truth=args.ground_truth, session=args.session,
                        model=args.model)
    print(f"wrote {path}")
    return 0


def cmd_dataset_split(args: argparse.Namespace) -> int:
    from faceps.datasets.torch_data import write_split

    try:
        fractions = tuple(float(f) for f in args.fractions.split(","))
    except ValueError:
        raise ConfigError(f"--fractions: expected numbers such as 0.8,0.1,0.1; got "
                          f"'{args.fractions}'") from None
    result = write_split(args.file, args.out, fractions, seed=args.seed)
    print(result.summary())
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from faceps.learn.train import leave_process, run_from_args

    result = run_from_args(args, kind=args.kind)
    print(result.summary())
    return leave_process(result.world_size)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from faceps.learn.evaluate import evaluate

    n_images = None
    if args.num_images:
        try:
            n_images = [int(k) for k in args.num_images.split(",")]
        except ValueError:
            raise ConfigError(f"--num-images: expected counts such as 1,2,3; got "
                              f"'{args.num_images}'") from None
    result = evaluate(args.run, args.data, n_images=n_images, proxy=args.proxy,
                      passes=args.passes,
                      ablation_no_proxy=args.ablation, no_proxy_run=args.no_proxy_run,
                      out_dir=args.out, max_samples=args.max_samples,
                      progress=not args.quiet and sys.stderr.isatty())
    print(result.table_markdown())
    return 0


def cmd_export_weights(args: argparse.Namespace) -> int:
    from faceps.learn.checkpoint import export_weights, load_file

    path = export_weights(args.run, args.out, which=args.which, float16=args.float16)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    crop = load_file(path).get("crop")
    if crop:
        print(f"input crop recorded in the file: {crop['size']} px, scale {crop['scale']} "
              f"({crop['source']})")
    else:
        print("warning: the input crop of this network is not known (no crop.json beside "
              "the run and no readable training data): put a crop.json beside the file, or "
              "`faceps infer` assumes the dataset default")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    capture = load_session_importing(args.session, ("faceps.learn.infer",))
    from faceps.learn.infer import InferConfig, infer, write_inference

    images = tuple(args.images.split(",")) if args.images else None
    config = InferConfig(num_images=args.num_images, images=images, weights=args.weights,
                         integrate=args.integrate, landmarks=args.landmarks,
                         proxy=args.proxy, passes=args.passes, threads=args.threads,
                         device=args.device, arch=args.arch, wls_lambda=args.wls_lambda,
                         normal_weights=args.normal_weights, proxy_weights=args.proxy_weights)
    inf = infer(capture, config)
    files = write_inference(args.out, inf, capture)
    t = inf.timings
    print(f"inferred normals and depth from {len(inf.image_names)} image(s) "
          f"({', '.join(inf.image_names)}) in {t['session']:.2f} s (+ {t['load']:.2f} s "
          f"loading the networks)")
    for w in inf.report.get("warnings", []):
        print(f"warning: {w}")
    print(f"wrote {len(files)} files to {args.out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from faceps.capture.target import calibrate_target_file
    from faceps.core.atomic import save_json

    result = calibrate_target_file(args.target, fit_led=True if args.fit_led else None)
    save_json(args.out, {"lights": result.lights.to_dict()})
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"calibrated {len(result.lights)} lights (relative RMS {result.rms:.4f}, "
          f"condition {result.condition:.3g}) -> {args.out}")
    return 0


# ------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faceps",
        description="Near-light photometric-stereo face capture, datasets and learning.",
    )
    parser.add_argument("--version", action="version", version=f"faceps {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v info, -vv debug)")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks for errors (implies -vv)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="synthesize a capture from the built-in model and process it")
    p.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=(800, 600), help="capture size WxH")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("inspect", help="validate a capture session and write a contact sheet")
    p.add_argument("session", help="session folder (with session.json) or the json file")
    p.add_argument("--out", help="contact-sheet PNG (default: SESSION/contact_sheet.png)")
    p.set_defaults(handler=cmd_inspect)

    ps = sub.add_parser("synth", help="synthetic data: capture sessions with ground truth")
    ssub = ps.add_subparsers(dest="synth_command", metavar="ACTION")
    ps.set_defaults(handler=lambda a: _missing(ps))
    p = ssub.add_parser("session", help="render a random face as a capture session + ground truth")
    p.add_argument("--out", required=True, help="session folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="builtin", help="a .npz model file or 'builtin'")
    p.add_argument("--lights", type=int, default=3, help="number of lights (default 3)")
    p.add_argument("--size", type=_size, default=(1600, 1200), help="WxH (default 1600x1200)")
    p.add_argument("--bit-depth", type=int, choices=[8, 16], default=8,
                   help="8-bit sRGB (default) or 16-bit linear PNG")
    p.add_argument("--landmark-noise", type=float, default=0.0, help="landmark noise std, px")
    p.add_argument("--lambertian", action="store_true", help="no specular sheen")
    p.add_argument("--no-noise", action="store_true", help="no sensor noise")
    p.add_argument("--no-lights", action="store_true",
                   help="leave the calibrated lights out of session.json")
    p.add_argument("--lighting", choices=("near", "wild"), default="near",
                   help="near point lights (default) or in the wild: --lights images, each "
                   "under a random environment (spherical harmonics, maybe a distant light) "
                   "over a procedural background, maybe behind hair/glasses occluders; "
                   "no lights in session.json")
    _add_bumps_argument(p)
    p.add_argument("--force", action="store_true", help="replace an existing folder")
    p.set_defaults(handler=cmd_synth_session)

    p = ssub.add_parser("dataset", help="render random face crops into an HDF5 dataset "
                        "(contract 4): shards + index")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--size", type=int, default=256, help="crop size in pixels (default 256)")
    p.add_argument("--out", required=True, help="index file NAME.h5 (shards NAME-00000.h5, ...)")
    p.add_argument("--workers", type=int, default=1, help="rendering processes (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lights", type=int, default=3, help="lights per sample (default 3)")
    p.add_argument("--shard-size", type=int, default=500, help="samples per shard (default 500)")
    p.add_argument("--model", default="builtin", help="a .npz model file or 'builtin'")
    p.add_argument("--crop-scale", type=float, default=1.6,
                   help="crop side / landmark box side (default 1.6)")
    p.add_argument("--scan", action="append", metavar="DIR",
                   help="a registered scan (folder of 'faceps synth register'); repeatable")
    p.add_argument("--scan-fraction", type=float, default=0.0,
                   help="probability that a sample is one of the scans (default 0)")
    p.add_argument("--lighting", choices=("near", "wild", "mixed"), default="near",
                   help="near point lights (default), in the wild (--lights images per "
                   "sample, each under a random environment over a random background), or "
                   "mixed (each sample wild with probability --wild-fraction); recorded per "
                   "sample in samples/lighting")
    p.add_argument("--wild-fraction", type=float, default=0.5,
                   help="share of in-the-wild samples of --lighting mixed (default 0.5)")
    _add_bumps_argument(p)
    p.add_argument("--lambertian", action="store_true", help="no specular sheen")
    p.add_argument("--no-noise", action="store_true", help="no sensor noise")
    p.add_argument("--force", action="store_true",
                   help="rebuild over the files of a build with other arguments")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from faceps.core.executor import add_arguments as add_executor_arguments

    add_executor_arguments(p)
    p.set_defaults(handler=cmd_synth_dataset)

    pd = sub.add_parser("dataset", help="HDF5 datasets (contract 4): inspect")
    dsub = pd.add_subparsers(dest="dataset_command", metavar="ACTION")
    pd.set_defaults(handler=lambda a: _missing(pd))
    p = dsub.add_parser("info", help="validate a dataset, print a summary, write a preview")
    p.add_argument("file", help="dataset .h5 (an index or a single file)")
    p.add_argument("--preview", help="write a preview grid PNG here")
    p.add_argument("--rows", type=int, default=4, help="samples in the preview (default 4)")
    p.set_defaults(handler=cmd_dataset_info)
    p = dsub.add_parser("split", help="split a dataset by subject into train/val/test "
                                      "index files (JSON)")
    p.add_argument("file", help="dataset .h5 (an index or a single file)")
    p.add_argument("--out", required=True, help="folder for train.json, val.json, test.json")
    p.add_argument("--fractions", default="0.8,0.1,0.1",
                   help="train,val,test fractions of the subjects (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subject shuffle")
    p.set_defaults(handler=cmd_dataset_split)

    p = sub.add_parser("train", help="train ProxyNet or NormalNet on a dataset "
                                     "(runs data-parallel under torchrun)")
    p.add_argument("kind", choices=["proxy", "normal"], help="network to train")
    from faceps.learn.arguments import add_arguments

    add_arguments(p, kind_option=False)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("evaluate", help="score a trained network on a dataset "
                                        "(the paper's Table 1 layout)")
    p.add_argument("run", help="run folder (or a weights file)")
    p.add_argument("--data", required=True, help="test data (.h5 or split .json)")
    p.add_argument("--out", help="folder for eval.json, eval.md and error maps "
                                 "(default: RUN/eval-<data>)")
    p.add_argument("--num-images", help="image counts to score, e.g. 1,3 (default: all)")
    p.add_argument("--ablation", action="store_true",
                   help="also the Table 2 ablation without the proxy input")
    p.add_argument("--no-proxy-run", help="a run trained without proxy input, for Table 2")
    p.add_argument("--max-samples", type=int, help="score at most this many samples")
    p.add_argument("--proxy", help="NormalNet proxy input: perturbed, dataset or proxynet:RUN "
                                   "(default: the run's training source)")
    p.add_argument("--passes", type=int,
                   help="NormalNet passes, each after the first with the previous estimate "
                        "as the proxy (default: what the network was trained for)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("export-weights", help="write a run's weights-only file (e.g. to ship "
                                              "it, optionally in half precision)")
    p.add_argument("run", help="run folder (or a weights/checkpoint file)")
    p.add_argument("--out", required=True, help="the .pt file to write")
    p.add_argument("--which", default="auto", choices=["auto", "best", "weights", "checkpoint"],
                   help="which file of a run folder (default: best.pt when validated)")
    p.add_argument("--float16", action="store_true", help="store tensors in half precision")
    p.set_defaults(handler=cmd_export_weights)

    p = ssub.add_parser("register", help="register the model's template to a face scan (NICP)")
    p.add_argument("scan", help="scan mesh (OBJ or PLY; optional vertex colours or texture)")
    p.add_argument("--model", default="builtin", help="a .npz model file or 'builtin'")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--landmarks", help="JSON file of 68 [x, y, z] scan points (scan units)")
    p.add_argument("--scale", default="auto", help="scan units to mm: a factor or 'auto'")
    p.add_argument("--region", choices=["all", "face", "crop"], default="crop",
                   help="template part to register (default: the face, cropped)")
    p.add_argument("--name", help="subject label of samples rendered from it (default: "
                                  "the scan's file name)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_synth_register)

    from faceps.datasets.real import BREAK_RATIO_HELP, add_fit_source_arguments

    p = sub.add_parser("fit", help="fit the coarse proxy (and calibrate the lights) of a session")
    p.add_argument("session", help="session folder (with session.json) or the json file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default="builtin", help="a .npz model file or 'builtin'")
    add_fit_source_arguments(p)
    p.add_argument("--no-photometric", action="store_true",
                   help="landmark fit only (no photometric refinement)")
    p.set_defaults(handler=cmd_fit)

    from faceps.datasets.real import add_arguments as add_build_dataset_arguments

    p = sub.add_parser("build-dataset", help="reconstruct every capture session under ROOT "
                                             "into an HDF5 dataset (contract 4, source real)")
    add_build_dataset_arguments(p)
    p.set_defaults(handler=cmd_build_dataset)

    p = sub.add_parser("reconstruct", help="reconstruct normals, albedo, depth and a mesh "
                                           "of a session (photometric stereo, eq. 5-7)")
    p.add_argument("session", help="session folder (with session.json) or the json file")
    p.add_argument("--out", required=True, help="output folder (contract 2 files)")
    p.add_argument("--model", default="builtin", help="a .npz model file or 'builtin'")
    add_fit_source_arguments(p)
    p.add_argument("--domain", choices=["pixel", "triangle"], default="pixel",
                   help="normal/albedo update per pixel (default) or per proxy triangle")
    p.add_argument("--region", choices=["face", "visible"], default="face",
                   help="reconstructed region: the model's face region or all it sees")
    p.add_argument("--max-size", type=int, default=None, metavar="PX",
                   help="work on a copy whose longer side is at most PX, then upsample")
    p.add_argument("--passes", type=int, default=1,
                   help="extra normal-update / height-field rounds with the height "
                        "field's normals as the prior (default 1; 0 is 1-4 s faster at "
                        "1600x1200 and 0.34 degrees less accurate on synthetic sessions)")
    p.add_argument("--distance", choices=["auto", "search", "off"], default="auto",
                   help="scale the proxy about the camera to the distance that best "
                        "explains the images (auto: when the session gives the lights)")
    p.add_argument("--mu1", type=float, help="weight of the proxy-normal prior (eq. 6)")
    p.add_argument("--mu2", type=float, help="weight of the albedo smoothness (eq. 6)")
    p.add_argument("--iterations", type=int, help="alternating normal/albedo iterations")
    p.add_argument("--w1", type=float, help="height-field depth prior weight (eq. 7)")
    p.add_argument("--w2", type=float, help="height-field Laplacian weight (eq. 7)")
    p.add_argument("--break-ratio", type=float, metavar="R", help=BREAK_RATIO_HELP)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_reconstruct)

    from faceps.datasets.real import add_batch_arguments

    p = sub.add_parser("reconstruct-batch", help="reconstruct every capture session under "
                                                 "ROOT into OUTDIR/<session path>/ "
                                                 "(contract 2), locally or on Ray")
    add_batch_arguments(p)
    p.set_defaults(handler=cmd_reconstruct_batch)

    p = sub.add_parser("report", help="write OUT_DIR/report.html: one self-contained page of a "
                                      "reconstruction (maps, mesh views, timings, errors)")
    p.add_argument("out_dir", help="a reconstruction folder (of faceps reconstruct or infer)")
    p.add_argument("--ground-truth", metavar="GT_DIR",
                   help="a synthetic session's ground_truth/ folder: adds errors and error maps")
    p.add_argument("--session", help="the capture session, for the input images and the "
                                     "proxy (default: the ground truth's session)")
    p.add_argument("--model", default=None,
                   help="the morphable model of proxy.json, a .npz file (default: the "
                        "built-in model when proxy.json names it)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("infer", help="reconstruct a session from 1..N images with the "
                                     "trained networks (no lights needed)")
    p.add_argument("session", help="session folder (with session.json) or the json file")
    p.add_argument("--out", required=True, help="output folder (contract 2 files)")
    p.add_argument("--num-images", type=int, help="use the first K images (default: all)")
    p.add_argument("--images", help="use these lights' images, e.g. front or left,right")
    p.add_argument("--weights", help="folder with proxy.pt and normal.pt, or with the run "
                                     "folders proxy/ and normal/ (default: shipped weights)")
    p.add_argument("--normal-weights", help="the normal network: a run folder or .pt file "
                                            "(overrides --weights for it)")
    p.add_argument("--proxy-weights", help="ProxyNet: a run folder or .pt file (overrides "
                                           "--weights for it)")
    p.add_argument("--arch", choices=["facepsnet", "casfne", "exemplar", "crossmodal"],
                   help="normal network architecture: picks the shipped normal-ARCH.pt and "
                        "checks the weights are of it (default: whatever they are)")
    p.add_argument("--integrate", choices=["gn", "wls", "fc"], default="gn",
                   help="normal integration: Gauss-Newton height field (default), weighted "
                        "least squares (gradient-weighted when the network predicts the "
                        "depth-gradient magnitude) or Frankot-Chellappa")
    p.add_argument("--wls-lambda", type=float, default=0.1,
                   help="lambda of the WLS weight 1 / (1 + lambda W) (default 0.1)")
    p.add_argument("--landmarks", choices=["auto", "session", "dlib"], default="auto",
                   help="landmark source (auto: the session's, else the detector)")
    p.add_argument("--proxy", choices=["proxynet", "landmarks"], default="proxynet",
                   help="proxy from ProxyNet (default, the paper) or from the morphable "
                        "model fitted to the landmarks")
    p.add_argument("--passes", type=int,
                   help="NormalNet passes, each after the first with the previous estimate "
                        "as the proxy (default: what the network was trained for)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.set_defaults(handler=cmd_infer)

    p = sub.add_parser("calibrate", help="calibrate near point lights from images of a "
                                         "sphere or plane target")
    p.add_argument("target", help="target description JSON (see docs/formats.md)")
    p.add_argument("--out", required=True, help="lights JSON to write (session light schema)")
    p.add_argument("--fit-led", action="store_true",
                   help="also fit LED axes and anisotropy (default: with more than 4 poses)")
    p.set_defaults(handler=cmd_calibrate)

    pm = sub.add_parser("model", help="morphable face models: info, preview, import")
    msub = pm.add_subparsers(dest="model_command", metavar="ACTION")
    pm.set_defaults(handler=lambda a: _missing(pm))
    p = msub.add_parser("info", help="print a model's size, components, landmarks, licence")
    p.add_argument("model", nargs="?", default="builtin", help="a .npz file or 'builtin'")
    p.set_defaults(handler=cmd_model_info)
    p = msub.add_parser("preview", help="render a grid of random faces to a PNG")
    p.add_argument("model", nargs="?", default="builtin", help="a .npz file or 'builtin'")
    p.add_argument("--out", default="model_preview.png")
    p.add_argument("--n", type=int, default=8, help="number of random faces")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=256, help="tile size in pixels")
    p.set_defaults(handler=cmd_model_preview)
    p = msub.add_parser("import", help="convert a research model into a faceps .npz")
    p.add_argument("kind", choices=["ict-facekit", "sfm", "bfm2009", "bfm2017", "bfm2019",
                                    "flame"])
    p.add_argument("src", help="model folder or file")
    p.add_argument("--out", required=True, help="output .npz")
    p.add_argument("--whole-head", action="store_true",
                   help="ict-facekit: keep the whole head, not only the face area")
    p.set_defaults(handler=cmd_model_import)
    return parser


def _missing(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(2 if args.debug else args.verbose)
    retain_freed_memory()
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        print("faceps: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FacepsError as exc:
        if args.debug:
            raise
        print(f"faceps: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as exc:
        # Bad values that reached a library call unchecked are still the user's input;
        # report them in one line too, and keep the traceback for --debug.
        if args.debug:
            raise
        kind = "error" if isinstance(exc, OSError) else "invalid value"
        print(f"faceps: {kind}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _leave(code: int) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown.

    Tearing down torch's and open3d's modules at exit took 0.5-0.8 s here after every
    command (``python -c "import torch, open3d"`` exits 0.64 s later than the same with
    ``os._exit``), time a user waits for nothing. Everything that matters at exit still
    runs: running non-daemon threads are waited for, the streams are flushed, logging is
    shut down and the ``atexit`` handlers (multiprocessing's clean-up among them) are
    called; outputs are written atomically and their files closed before a command
    returns.
    """
    import atexit
    import threading

    try:
        # What the interpreter does first at exit: wait for non-daemon threads (after
        # waking idle thread pools), then run the atexit handlers.
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        logging.shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe (``faceps ... | head``)
                pass
        os._exit(code)


def console(argv: Sequence[str] | None = None) -> NoReturn:
    """The installed ``faceps`` command: :func:`main`, then a quick exit (:func:`_leave`).
    Uncaught exceptions (``--debug``) leave the normal way, with their traceback, and so
    does everything under a profiler, debugger or coverage tool (``python -m cProfile -m
    faceps ...``), which writes its results at the interpreter's exit."""
    code = main(argv)
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(code)  # a profiler, debugger or coverage tool writes its results at exit
    _leave(code)


__all__ = ["main", "console", "build_parser", "ConfigError"]
