"""`python -m services.trainer [--cfg] [OVERRIDE ...]`: train with Hydra overrides from config/.

Turns every expected failure into one line on stderr and a non-zero exit; it must not train itself.
"""

from __future__ import annotations

import os
import sys
import traceback

USAGE = """\
usage: python -m services.trainer [--cfg] [OVERRIDE ...]

Train the language model with the config in config/ (Hydra overrides), e.g.
  python -m services.trainer model=tiny train.max_steps=50
  python -m services.trainer data=text data.source='books/*.txt' train.epochs=2 train.max_steps=null
  torchrun --nproc-per-node 2 -m services.trainer model=tiny

  --cfg       print the composed config and exit
  -h, --help  this help

Groups: model=tiny|small|gpt2-124m  data=shakespeare|text  train=cpu|gpu  serve=default.
Exit codes: 0 done, 2 bad config, corpus or launch environment, 143 stopped by SIGTERM
(checkpoint saved, or nothing trained yet), 130 interrupted by Ctrl-C (no checkpoint), 1 other.
"""

EXIT_CONFIG = 2
EXIT_FAILED = 1


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(USAGE, end="")
        return 0
    print_only = "--cfg" in args
    overrides = [a for a in args if a != "--cfg"]
    try:
        return _main(overrides, print_only)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _main(overrides: list[str], print_only: bool) -> int:
    # Imported here so --help stays instant and import errors become one line too.
    try:
        from omegaconf import OmegaConf

        from services.trainer import errors, schema
    except ImportError as exc:
        return _fail(f"{exc} (install the trainer's extras: pip install 'llm-pipeline[train]')",
                     EXIT_CONFIG)
    try:
        cfg = schema.compose(overrides)
        if print_only:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        schema.validate(cfg)
    except Exception as exc:
        if not errors.is_config_error(exc):
            raise
        return _fail(errors.one_line(exc), EXIT_CONFIG)

    from lmcore.train import TrainingInterrupted
    from services.trainer.job import run

    try:
        result = run(cfg)
    except TrainingInterrupted as exc:
        return _fail(str(exc), exc.exit_code)
    except Exception as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            traceback.print_exc()
        code = EXIT_CONFIG if errors.is_config_error(exc) else EXIT_FAILED
        return _fail(errors.one_line(exc), code)
    if result.model_dir is not None:
        print(f"model dir: {result.model_dir} (step {result.steps}, "
              f"val loss {result.final_val_loss:.4f}, run {result.run_id})", file=sys.stderr)
    return 0


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
