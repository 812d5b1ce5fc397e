"""``dcar edit --image in.png --mask mask.png "prompt" -o out.png``: inpainting (white in the mask = regenerate)."""

from __future__ import annotations

import argparse

from PIL import Image

from dcar.cli.common import (
    add_sampling_arguments,
    check_outputs,
    fail,
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
    add_sampling_arguments(
        p, size_help="the size of --image, the only one an edit takes (default: the image's)"
    )


def read_image(args: argparse.Namespace, flag: str, path: str) -> Image.Image:
    """The image file of ``flag``, decoded now: a missing or unreadable one ends the command with one line."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        fail(
            args, f"{flag}: cannot read {path}: {e.strerror if isinstance(e, OSError) and e.strerror else e}"
        )


def run(args: argparse.Namespace) -> int:
    from dcar.model.images import mask_to_tensor

    image = read_image(args, "--image", args.image).convert("RGB")
    mask = mask_to_tensor(read_image(args, "--mask", args.mask))
    paths = output_paths(args.output, args.n)
    check_outputs(args, paths)
    if args.size is not None and tuple(args.size) != image.size:  # it was silently replaced by the image's
        fail(
            args,
            f"--size: an edit keeps the size of --image ({image.size[0]}x{image.size[1]}); "
            f"got {args.size[0]}x{args.size[1]}: resize the image and the mask instead",
        )
    pipe = load_pipeline(args)
    args.size = image.size
    try:
        params = sampling_params(pipe, args)
        edit = pipe.prepare_edit(image, mask, blend=not args.no_blend)
    except ValueError as e:
        fail(args, str(e))
    results = run_with_progress(pipe, params, [edit] * len(params))
    save_results(args, results, paths)
    return 0
