"""The ``jaxcnn`` command."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxcnn",
        description="Convolutional networks in JAX with hand-derived backward passes, checked against jax.grad.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser("demo", help="run a small conv net forward and backward with every gradient "
                                            "mode and print how far apart the gradients are")
    demo.add_argument("--seed", type=int, default=0, help="PRNG seed for the weights and the batch (default 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from jaxcnn import demo

        return demo.main(seed=args.seed)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
