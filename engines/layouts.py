"""A validated text-to-image mix in the folder layout another runtime loads.

    dd-layout OUT --layout optimum-onnx|openvino -o DIR [--precision MIX]

`optimum-onnx`: what optimum-onnx's `ORTDiffusionPipeline.from_pretrained(DIR)` reads (diffusers'
Python API over ONNX Runtime): model_index.json, one folder per component with `model.onnx` (and
its external weights under their recorded name) and the model's `config.json`, the tokenizer as
tokenizer.json + tokenizer_config.json (CLIPTokenizerFast), scheduler/scheduler_config.json. The
graphs are dd-compile's validated ones, byte for byte (their IO names are optimum's: input_ids ->
last_hidden_state, sample/timestep/encoder_hidden_states -> out_sample, latent_sample -> sample,
sample -> latent_parameters). `dd-compile.json` beside them records the mix, its validation (the
report travels as report.json) and the runtime versions the layout was checked with
(benchmarks/layout_check.py); a reader of another version is told so by engines/layouts.check_reader.

`openvino`: what openvino.genai's `Text2ImagePipeline(DIR, "CPU")` (C++, torch-free) and
optimum-intel's OV pipelines read: the same folders with each graph converted to OpenVINO IR
(`openvino_model.xml/.bin`, `openvino.convert_model` of the validated ONNX, weights kept as they
are; the UNet's timestep taken as int64, what genai feeds, converted to the graph's float32 by
OpenVINO's preprocessing), the tokenizer converted by openvino_tokenizers, and model_index.json
with a `vae` entry and no null ones (genai reads every entry as a string). OpenVINO's CPU plugin
runs f32 models at bf16 on AMX unless told otherwise, so dd-compile.json names the property the
validation held under (`INFERENCE_PRECISION_HINT`: f32, or bf16 for a bf16 mix, which only this
layout takes) and the README shows it passed to the pipeline.

SD 1.x / LCM pipelines only for now: optimum's SDXL pipeline reads every hidden state of its text
encoders (`hidden_states.{i}`), which dd-compile's graphs do not output.

Written in a staging folder beside DIR and swapped in (engines/outdir.py's rule, marker kind
`layout`): a failed write leaves the previous layout as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engines.errors import InputError
from engines.fileio import sha256_file

log = logging.getLogger(__name__)

LAYOUTS = ("optimum-onnx", "openvino")
KIND = "layout"
# what benchmarks/layout_check.py ran each layout with (peers venv, 2026-12-07); other versions
# may read it the same way, but nobody checked
CHECKED_WITH = {
    "optimum-onnx": {"optimum-onnx": "0.1.0", "diffusers": "0.39.0", "onnxruntime": "1.32.0"},
    "openvino": {"openvino-genai": "2026.4.1.0", "openvino": "2026.4.1"},
}
FAMILY_CLASSES = {"sd": ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")}
TEXT_MODEL = {"sd": "CLIPTextModel"}


def _tokenizer_config(tok: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json for CLIPTokenizerFast: the limit and special tokens the pipeline pads
    and truncates with (tokenizer.json alone leaves model_max_length unbounded)."""
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": int(tok["model_max_length"]),
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": tok["pad_token"],
        "do_lower_case": True,
    }


def _model_index(desc: dict[str, Any], scheduler_class: str, layout: str) -> dict[str, Any]:
    index = {
        "_class_name": desc["pipeline_class"],
        "_diffusers_version": CHECKED_WITH["optimum-onnx"]["diffusers"],
        "text_encoder": ["transformers", TEXT_MODEL[desc["family"]]],
        "tokenizer": ["transformers", "CLIPTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_decoder": ["diffusers", "AutoencoderKL"],
        **({"vae_encoder": ["diffusers", "AutoencoderKL"]} if "vae_encoder" in desc["components"] else {}),
        "scheduler": ["diffusers", scheduler_class],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    if layout == "openvino":  # genai reads every entry as [library, class] strings, and "vae"
        index = {
            k: v for k, v in index.items() if k.startswith("_") or (isinstance(v, list) and None not in v)
        }
        index["vae"] = ["diffusers", "AutoencoderKL"]
    return index


def _to_ir(src: Path, dest: Path, kind: str) -> str:
    """openvino_model.xml/.bin from a validated ONNX graph (weights as they are) -> the xml's sha256."""
    from engines.openvino_runner import import_openvino

    ov = import_openvino()
    dest.mkdir(parents=True)
    model = ov.convert_model(str(src))
    if kind == "unet":  # genai (and optimum-intel's IR) feed the timestep as int64
        from openvino.preprocess import PrePostProcessor

        ppp = PrePostProcessor(model)
        ppp.input("timestep").tensor().set_element_type(ov.Type.i64)
        model = ppp.build()
    ov.save_model(model, str(dest / "openvino_model.xml"), compress_to_fp16=False)
    return sha256_file(dest / "openvino_model.xml")


def _ov_tokenizer(folder: Path) -> None:
    """openvino_tokenizer.xml / openvino_detokenizer.xml beside tokenizer.json (genai tokenizes
    with them), converted by openvino_tokenizers from the same CLIP tokenizer."""
    from engines.errors import BackendUnavailable
    from engines.openvino_runner import import_openvino

    ov = import_openvino()
    try:
        from openvino_tokenizers import convert_tokenizer
        from transformers import CLIPTokenizerFast
    except ImportError as e:
        raise BackendUnavailable(
            f"--layout openvino converts the tokenizer with openvino_tokenizers and transformers ({e}): "
            "pip install 'dd-compile[openvino]'"
        ) from None
    tok, detok = convert_tokenizer(CLIPTokenizerFast.from_pretrained(folder), with_detokenizer=True)
    ov.save_model(tok, str(folder / "openvino_tokenizer.xml"))
    ov.save_model(detok, str(folder / "openvino_detokenizer.xml"))


def _copy_graph(src: Path, dest: Path) -> str:
    """model.onnx (+ its external weights, whose recorded file name the graph names) -> sha256."""
    dest.mkdir(parents=True)
    shutil.copyfile(src, dest / "model.onnx")
    ext = src.with_name(src.name + ".data")
    if ext.exists():
        shutil.copyfile(ext, dest / ext.name)
    return sha256_file(dest / "model.onnx")


def check_layout_source(desc: dict[str, Any], where: Path, layout: str = "optimum-onnx") -> None:
    """One line for what the layout's runtime cannot load from this mix."""
    family = desc.get("family", "sd")
    if family not in FAMILY_CLASSES or desc["pipeline_class"] not in FAMILY_CLASSES[family]:
        raise InputError(
            f"{where}: --layout {layout} writes SD 1.x / LCM pipelines "
            f"({', '.join(FAMILY_CLASSES['sd'])}), not {desc['pipeline_class']}"
        )
    if desc.get("prompt_chunks", 1) != 1:
        raise InputError(f"{where}: a UNet compiled for prompt chunks (--prompt-chunks): optimum pads to 77")
    missing = [k for k, c in desc["components"].items() if "config" not in c]
    if missing:
        raise InputError(
            f"{where}: no model config recorded for {', '.join(missing)} (compiled before dd-compile "
            "recorded them; recompile it)"
        )
    slotted = [k for k, c in desc["components"].items() if c.get("lora")]
    if slotted:  # their runtimes feed a model's own inputs, not LoRA's
        raise InputError(
            f"{where}: {', '.join(slotted)} take LoRA inputs (dd-compile --lora-rank), which "
            f"{layout}'s runtime does not feed: compile without --lora-rank for this layout"
        )
    for k, c in desc["components"].items():
        # the fp32 graph under OpenVINO's hint: what ORT would run is not what was validated
        if c.get("precision") == "bf16" and layout != "openvino":
            raise InputError(f"{where}: {k} is bf16 (OpenVINO's hint): pick another mix with --precision")


def write_layout(
    out_dir: str | Path,
    dest: str | Path,
    layout: str = "optimum-onnx",
    precision: str | None = None,
    allow_unvalidated: bool = False,
) -> Path:
    """Write the mix `precision` (default: the recommended one) of the dd-compile output `out_dir`
    as `layout` into `dest` (new, empty, or a layout dd-layout wrote: then replaced)."""
    import engines
    from engines.deploy_common import swap_in
    from engines.outdir import check_target, claim

    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout!r}: choose from {', '.join(LAYOUTS)}")
    out_dir, dest = Path(out_dir), Path(dest)
    dest = check_target(dest, KIND, "-o", protect=[out_dir])
    # every file the mix reads is verified (sha256, and validation on the runtime family the
    # layout's reader runs: an OpenVINO layout needs a mix dd-compile validated on OpenVINO)
    backend = "openvino" if layout == "openvino" else "onnxruntime"
    pipe = engines.load(out_dir, precision=precision, backend=backend, allow_unvalidated=allow_unvalidated)
    try:
        from engines.manifest import Manifest

        cfg = pipe.config
        mix = precision or Manifest.load(out_dir).meta.get("recommended") or "fp32"
        # the mix's description engines.load verified (its pipeline/<mix> artifact)
        desc = json.loads((cfg.root / f"t2i.{mix}.json").read_text())
        check_layout_source(desc, out_dir, layout)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
        try:
            shas = {}
            for kind, c in desc["components"].items():
                if layout == "openvino":
                    shas[kind] = _to_ir(cfg.root / c["path"], tmp / kind, kind)
                else:
                    shas[kind] = _copy_graph(cfg.root / c["path"], tmp / kind)
                (tmp / kind / "config.json").write_text(json.dumps(c["config"], indent=2))
            (tmp / "tokenizer").mkdir()
            shutil.copyfile(cfg.root / desc["tokenizer"]["path"], tmp / "tokenizer" / "tokenizer.json")
            (tmp / "tokenizer" / "tokenizer_config.json").write_text(
                json.dumps(_tokenizer_config(desc["tokenizer"]), indent=2)
            )
            if layout == "openvino":
                _ov_tokenizer(tmp / "tokenizer")
            (tmp / "scheduler").mkdir()
            sched = json.loads((cfg.root / desc["scheduler"]["config"]).read_text())
            (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
            (tmp / "model_index.json").write_text(
                json.dumps(_model_index(desc, sched["_class_name"], layout), indent=2)
            )
            report = cfg.root / "report.json"
            if report.exists():
                shutil.copyfile(report, tmp / "report.json")
            record = {
                "layout": layout,
                "source": str(out_dir.resolve()),
                "mix": mix,
                "precisions": {k: c.get("precision", "fp32") for k, c in desc["components"].items()},
                "graphs_sha256": shas,
                "checked_with": CHECKED_WITH[layout],
                "defaults": desc.get("defaults", {}),
            }
            if layout == "openvino":  # the precision the validation held under (CPU: bf16 on AMX else)
                bf16 = any(c.get("precision") == "bf16" for c in desc["components"].values())
                record["properties"] = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
            (tmp / "dd-compile.json").write_text(json.dumps(record, indent=2))
            claim(tmp, KIND, shas["unet"], layout=layout)
            swap_in(tmp, dest, "-o", kind=KIND)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    finally:
        pipe.close()
    log.info("wrote the %s layout %s", layout, dest)
    return dest


def check_reader(layout_dir: str | Path, versions: dict[str, str]) -> str | None:
    """None when `versions` (package -> version, what the reader runs) are the ones the layout was
    checked with, else one line saying which differ (a warning for the reader, not a refusal)."""
    rec = json.loads((Path(layout_dir) / "dd-compile.json").read_text())
    checked = rec.get("checked_with", {})
    diff = [
        f"{k} {versions.get(k, 'absent')} (checked: {v})" for k, v in checked.items() if versions.get(k) != v
    ]
    if not diff:
        return None
    return f"{layout_dir}: this {rec.get('layout')} layout was checked with other versions: {', '.join(diff)}"


def command() -> Any:
    """The `dd-layout` click command (click imported only here: the runtime does not need it)."""
    import click

    from engines.cli_errors import GuardedCommand

    @click.command(
        cls=GuardedCommand, prog="dd-layout", context_settings={"help_option_names": ["-h", "--help"]}
    )
    @click.argument("out_dir", type=click.Path(path_type=Path))
    @click.option("--layout", default="optimum-onnx", show_default=True, type=click.Choice(LAYOUTS))
    @click.option(
        "-o",
        "--out",
        "dest",
        required=True,
        type=click.Path(path_type=Path),
        help="Folder to write: new, empty, or one dd-layout wrote (then replaced).",
    )
    @click.option("--precision", default=None, help="The mix to write (default: the recommended one).")
    @click.option("--allow-unvalidated", is_flag=True, help="Write a mix its run did not validate.")
    def cli(out_dir: Path, layout: str, dest: Path, precision: str | None, allow_unvalidated: bool) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        written = write_layout(out_dir, dest, layout, precision, allow_unvalidated)
        load = f"optimum.onnxruntime.ORTDiffusionPipeline.from_pretrained({str(written)!r})"
        if layout == "openvino":
            hint = json.loads((written / "dd-compile.json").read_text())["properties"]
            load = f"openvino_genai.Text2ImagePipeline({str(written)!r}, 'CPU', **{hint})"
        click.echo(f"wrote {written}\nload it: {load}")

    return cli


def main(argv: list[str] | None = None) -> None:
    """Console script `dd-layout`."""
    command().main(args=argv, prog_name="dd-layout", standalone_mode=True)


if __name__ == "__main__":
    main()
