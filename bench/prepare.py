"""Throughput of `normtron prepare-data` against the tokenizer's own speed, with 1 and 2 workers, on a generated
corpus of real English text (Shakespeare's plays repeated, cut into ~3 KB JSON-lines documents).

    python bench/prepare.py                  # 300 MB corpus (and half of it, to show memory does not grow)
    python bench/prepare.py --mb 80 --workers 1 2

For each run it reports wall time, MB/s of document text end to end (and per worker), that per-worker rate as a
share of the ceiling — sentencepiece's own encode of the same documents in one process, without reading, JSON,
splitting or writing — the same per CPU second (which a shared, loaded machine distorts less), and the peak
resident memory (largest single process, and the whole process tree) and peak disk use of
the output directory next to its final size. A compressed (.jsonl.gz) copy of the corpus is prepared too when
the installed normtron reads .gz files. datatrove's DocumentTokenizer and Megatron's tools/preprocess_data.py are
not run: see the note the script prints.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOC_CHARS = 3000
FILE_MB = 16  # generated files: several shards' worth of work for the workers
OTHER_TOOLS = ("Megatron-LM's tools/preprocess_data.py is not run: it is not in the megatron-core wheel and needs a "
               "Megatron-LM checkout and torch")


def shakespeare_documents() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "normtron", "download-corpus", "shakespeare"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    docs = []
    for path in sorted(Path(out).glob("*.txt")):
        text = path.read_text(encoding="utf-8-sig")
        docs.extend(text[i:i + DOC_CHARS] for i in range(0, len(text), DOC_CHARS))
    return docs


def write_corpus(root: Path, docs: list[str], mb: float, compress: bool) -> tuple[int, int]:
    """`mb` MB of JSON lines (the documents repeated) in files of FILE_MB MB; returns (bytes on disk, bytes of
    document text in UTF-8: the basis of every rate)."""
    root.mkdir(parents=True)
    target, written, text_bytes, i, n_file = mb * 1e6, 0, 0, 0, 0
    while written < target:
        name = root / (f"part{n_file:04d}.jsonl" + (".gz" if compress else ""))
        with (gzip.open(name, "wt", compresslevel=6) if compress else open(name, "w")) as f:
            size = 0
            while size < FILE_MB * 1e6 and written + size < target:
                line = json.dumps({"text": docs[i % len(docs)], "id": i}) + "\n"
                f.write(line)
                size += len(line.encode())
                text_bytes += len(docs[i % len(docs)].encode())
                i += 1
        written += size
        n_file += 1
    return sum(p.stat().st_size for p in root.iterdir()), text_bytes


def raw_encode_mb_s(tokenizer: Path, corpus: Path) -> tuple[float, float]:
    """sentencepiece's encode of the corpus's documents in one process, one thread: the ceiling per worker, as
    (MB/s of wall time, MB per CPU second)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = [json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in open(p)]
    n_bytes = sum(len(d.encode()) for d in docs)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(docs), 256):
        sp.encode(docs[i:i + 256], num_threads=1)
    return n_bytes / 1e6 / (time.perf_counter() - start), n_bytes / 1e6 / (time.process_time() - cpu)


class Sampler(threading.Thread):
    """Polls a process tree's resident memory and a directory's disk use every 0.1 s, keeping the peaks."""

    def __init__(self, pid: int, directory: Path):
        super().__init__(daemon=True)
        self.pid, self.directory, self.stop = pid, directory, threading.Event()
        self.peak_rss = self.peak_tree_rss = self.peak_disk = 0
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds last seen (for workers no one reaps, e.g. forkserver's)

    def run(self) -> None:
        while not self.stop.is_set():
            tree = _tree(self.pid)
            for p in tree:
                self.cpu[p] = max(self.cpu.get(p, 0.0), _cpu_seconds(p))
            rss = [_rss(p) for p in tree]
            self.peak_rss = max(self.peak_rss, *rss, 0)
            self.peak_tree_rss = max(self.peak_tree_rss, sum(rss))
            self.peak_disk = max(self.peak_disk, disk_bytes(self.directory))
            time.sleep(0.1)


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
    return found


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def disk_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def prepare(corpus: Path, out: Path, tokenizer: Path, workers: int) -> dict:
    return run_measured([sys.executable, "-m", "normtron", "prepare-data", "--input", str(corpus), "--output",
                         str(out), "--tokenizer", str(tokenizer), "--workers", str(workers), "--shard-size",
                         f"{FILE_MB}MB"], out, {"PYTHONPATH": str(REPO)})


def run_measured(cmd: list[str], out: Path, env: dict) -> dict:
    """Run `cmd`, writing into `out`: wall and CPU seconds (every process of it), peak memory and disk."""
    import resource

    out.mkdir(parents=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})
    sampler = Sampler(proc.pid, out)
    sampler.start()
    log = proc.communicate()[0]
    seconds = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{log[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and its workers (waited for)
    cpu = max(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, sum(sampler.cpu.values()))
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss": sampler.peak_rss,
            "peak_tree_rss": sampler.peak_tree_rss, "peak_disk": sampler.peak_disk, "final_disk": disk_bytes(out)}


HEADER = ["run", "workers", "wall s", "MB/s", "MB/s per worker", "of ceiling", "MB per CPU s (of ceiling)",
          "vs 1 worker", "peak RSS MiB (process / tree)", "peak / final disk MB"]


def table_row(label: str, workers: int, result: dict, rate: float, ceiling: float, ceiling_cpu: float,
              text_mb: float, one_worker_rate: str | None) -> list[str]:
    per_cpu = text_mb / result["cpu_seconds"]
    return [label, str(workers), f"{result['seconds']:.1f}", f"{rate:.2f}", f"{rate / workers:.2f}",
            f"{100 * rate / workers / ceiling:.0f}%", f"{per_cpu:.2f} ({100 * per_cpu / ceiling_cpu:.0f}%)",
            f"{rate / float(one_worker_rate or rate):.2f}x",
            f"{result['peak_rss'] / 2**20:.0f} / {result['peak_tree_rss'] / 2**20:.0f}",
            f"{result['peak_disk'] / 1e6:.0f} / {result['final_disk'] / 1e6:.0f}"]


def datatrove_rows(root: Path, docs: list[str], corpus: Path, text_bytes: int, worker_counts: list[int]) -> list:
    """datatrove's JsonlReader -> DocumentTokenizer on the same corpus, with a Hugging Face byte-level BPE of the same
    vocabulary trained here on the same text (datatrove takes tokenizer.json only), next to that tokenizer's own
    one-thread encode_batch: its ceiling. Returns table rows (empty when datatrove is not installed)."""
    try:
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.readers import JsonlReader
        from datatrove.pipeline.tokens import DocumentTokenizer
    except ImportError:
        print("datatrove is not installed (pip install datatrove; it does not need torch): not compared")
        return []
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process, as each normtron worker
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"]))
    path = root / "hf-tokenizer.json"
    tok.save(str(path))
    texts = [json.loads(line)["text"] for p in sorted(corpus.glob("*.jsonl")) for line in open(p)]
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(texts), 256):
        tok.encode_batch(texts[i:i + 256])
    ceiling = text_bytes / 1e6 / (time.perf_counter() - start)
    ceiling_cpu = text_bytes / 1e6 / (time.process_time() - cpu)
    print(f"datatrove ceiling (HF tokenizers byte-level BPE, vocab 8192, encode_batch, 1 thread): {ceiling:.2f} MB/s, "
          f"{ceiling_cpu:.2f} MB per CPU second")
    rows = []
    for workers in worker_counts:
        out = root / f"datatrove-{workers}"
        script = (f"from datatrove.executor import LocalPipelineExecutor\n"
                  f"from datatrove.pipeline.readers import JsonlReader\n"
                  f"from datatrove.pipeline.tokens import DocumentTokenizer\n"
                  f"LocalPipelineExecutor([JsonlReader({str(corpus)!r}, glob_pattern='*.jsonl'), "
                  f"DocumentTokenizer({str(out / 'tokens')!r}, tokenizer_name_or_path={str(path)!r}, "
                  f"eos_token='<|endoftext|>', shuffle_documents=False)], tasks={workers}, workers={workers}, "
                  f"logging_dir={str(out / 'logs')!r}).run()\n")
        result = run_measured([sys.executable, "-c", script], out, {"TOKENIZERS_PARALLELISM": "false"})
        rate = text_bytes / 1e6 / result["seconds"]
        rows.append(table_row(f"datatrove, same jsonl ({text_bytes / 1e6:.0f} MB of text)", workers, result, rate,
                              ceiling, ceiling_cpu, text_bytes / 1e6, rows[0][3] if rows else None))
        shutil.rmtree(out)
    return rows


def reads_gzip() -> bool:
    """Whether this normtron's prepare-data reads .jsonl.gz (tried on a one-line file)."""
    from normtron.trainer.data.corpus import find_corpus_files, read_documents
    from normtron.trainer.errors import UserError

    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.jsonl.gz"
        with gzip.open(probe, "wt") as f:
            f.write(json.dumps({"text": "probe"}) + "\n")
        try:
            return [list(read_documents(p)) for p in find_corpus_files([probe])] == [["probe"]]
        except UserError:
            return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=300, help="corpus size in MB (default 300)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="sentencepiece vocabulary (default 8192)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    args = parser.parse_args()
    from normtron.trainer.data.tokenizer import train_sentencepiece

    root = Path(args.keep or tempfile.mkdtemp(prefix="nt-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        docs = shakespeare_documents()
        tok = train_sentencepiece(iter(docs), args.vocab_size, 1, log=lambda *a: None)
        tok_path = root / "tokenizer.model"
        tok.save(tok_path)
        sizes = {"full": args.mb, "half": args.mb / 2}
        corpora = {}
        for label, mb in sizes.items():
            corpora[("jsonl", label)] = write_corpus(root / f"jsonl-{label}", docs, mb, compress=False)
        if reads_gzip():
            corpora[("jsonl.gz", "full")] = write_corpus(root / "jsonl.gz-full", docs, args.mb, compress=True)
        ceiling, ceiling_cpu = raw_encode_mb_s(tok_path, root / "jsonl-full")
        print(f"machine: {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.2f} at the start; "
              f"tokenizer: sentencepiece BPE, vocab {args.vocab_size}; ceiling (sentencepiece encode, 1 process, "
              f"1 thread, same documents): {ceiling:.2f} MB/s, {ceiling_cpu:.2f} MB per CPU second\n")
        rows = []
        runs = [(("jsonl", "full"), w) for w in args.workers] + [(("jsonl", "half"), min(args.workers))]
        runs += [(("jsonl.gz", "full"), w) for w in args.workers if ("jsonl.gz", "full") in corpora]
        first = {}
        for (kind, label), workers in runs:
            in_bytes, text_bytes = corpora[(kind, label)]
            result = prepare(root / f"{kind}-{label}", root / f"out-{kind}-{label}-{workers}", tok_path, workers)
            shutil.rmtree(root / f"out-{kind}-{label}-{workers}")
            rate = text_bytes / 1e6 / result["seconds"]  # MB of document text, as the ceiling's
            rows.append(table_row(f"normtron, {kind} {in_bytes / 1e6:.0f} MB ({text_bytes / 1e6:.0f} MB of text)",
                                  workers, result, rate, ceiling, ceiling_cpu, text_bytes / 1e6,
                                  first.get((kind, label))))
            first.setdefault((kind, label), rows[-1][3])
        rows += datatrove_rows(root, docs, root / "jsonl-full", corpora[("jsonl", "full")][1], args.workers)
        print("| " + " | ".join(HEADER) + " |\n|" + "---|" * len(HEADER))
        for row in rows:
            print("| " + " | ".join(row) + " |")
        print(f"\nceiling: {ceiling:.2f} MB/s, {ceiling_cpu:.2f} MB per CPU second, per process. CPU seconds count "
              f"every process of a run (start-up, reading, JSON, hashing, writing, the final checks). "
              f"Not compared: {OTHER_TOOLS}."
              + ("" if reads_gzip() else " This normtron does not read .gz files yet: no compressed run."))
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
