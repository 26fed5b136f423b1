"""Weight conversion CLI: ``python -m convert_weights <model> --src ... --dst ...`` (also ``convert-weights``).

Each model is one entry of ``SUBCOMMANDS``: a module exposing ``add_arguments(parser)``, ``run(args) -> int``,
``DESCRIPTION`` and ``EXAMPLES``. Adding a model is adding its line to the table.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module implementing it
SUBCOMMANDS = {
    "flux": "convert_weights.flux",
    "flux-pipeline": "convert_weights.flux_pipeline",
    "wan": "convert_weights.wan",
    "wan-vae": "convert_weights.wan_vae",
    "mochi-vae": "convert_weights.mochi_vae",
    "hunyuan-vae": "convert_weights.hunyuan_vae",
    "umt5": "convert_weights.umt5",
    "llama": "convert_weights.llama",
    "clip-vision": "convert_weights.clip_vision",
    "hunyuan-video": "convert_weights.hunyuan_video",
    "mochi": "convert_weights.mochi",
}

EPILOG = """Converted checkpoints are directories holding an orbax checkpoint (params/) and manifest.json
(model, architecture config, dtype, sha256 of the source files). Conversion is strict: an unknown source key,
a missing target parameter or a shape mismatch stops it with the full list of offending keys.

examples:
  python -m convert_weights flux --src flux1-dev.safetensors --dst ckpt/flux-dev
  python -m convert_weights flux --src FLUX.1-dev/transformer --dst ckpt/flux-dev --dtype bf16
  python -m convert_weights flux --help
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per entry of SUBCOMMANDS."""
    parser = argparse.ArgumentParser(
        prog="python -m convert_weights",
        description="Convert PyTorch checkpoints (safetensors, no torch needed) into this project's orbax format.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.DESCRIPTION,
            description=module.DESCRIPTION,
            epilog=module.EXAMPLES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    from convert_weights.common import ConversionError

    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except (ConversionError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
