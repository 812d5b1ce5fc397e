"""``dcar edit --image in.png --mask mask.png "prompt" -o out.png``: inpainting (white in the mask = regenerate)."""

from __future__ import annotations

import argparse

from PIL import Image

from dcar.cli.common import (
    add_sampling_arguments,
    load_pipeline,
    output_paths,
    run_with_progress,
    sampling_params,
    save_results,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="input image; its size must be a multiple of 32")
    p.add_argument("--mask", required=True, help="mask image of the same size: white = regenerate")
    p.add_argument(
        "--no-blend",
        action="store_true",
        help="keep the decoded pixels outside the mask instead of the input's own pixels",
    )
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    from dcar.model.images import mask_to_tensor

    pipe = load_pipeline(args)
    image = Image.open(args.image).convert("RGB")
    mask = mask_to_tensor(Image.open(args.mask))
    args.size = image.size
    try:
        params = sampling_params(pipe, args)
        edit = pipe.prepare_edit(image, mask, blend=not args.no_blend)
    except ValueError as e:
        raise SystemExit(f"dcar edit: {e}") from e
    results = run_with_progress(pipe, params, [edit] * len(params))
    save_results(results, output_paths(args.output, len(results)))
    return 0
