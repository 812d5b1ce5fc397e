"""``dcar generate "prompt" -o out.png``: text-to-image from the command line."""

from __future__ import annotations

import argparse

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
    add_sampling_arguments(p)


def run(args: argparse.Namespace) -> int:
    paths = output_paths(args.output, args.n)
    check_outputs(args, paths)
    pipe = load_pipeline(args)
    try:
        params = sampling_params(pipe, args)
    except ValueError as e:
        fail(args, str(e))
    try:  # before any work: the sampler would refuse it only after the text encoder ran
        pipe.sampler.grid_for(params[0].height, params[0].width)
    except ValueError as e:
        fail(args, f"--size: {e}")
    results = run_with_progress(pipe, params)
    save_results(args, results, paths)
    return 0
