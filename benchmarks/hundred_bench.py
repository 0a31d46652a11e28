"""A hundred fine-tunes of one base on one vLLM server, asked in turn and at random from four real kernels.

Each fine-tune is a LoRA of the demo base built here (in a child process: torch never enters this one) with a
bias of its own: its last MLP's down_proj pushes the answer's first word to a word no other adapter gives, so
every answer proves which adapter wrote it. Printed, each with its goal and the floor it is measured against:
errors and wrong answers, servers started, first answer of a cold adapter against a warm one, the vLLM
processes' RSS growth per cached adapter, the registry file and lease handling at this size against one
adapter, and `sage ps` / `%sage status` as a person sees them.

    python benchmarks/hundred_bench.py [--short] [--home DEMO_HOME] [--vllm-arg '--max-cpu-loras 100']

Reports, does not gate: a missed goal exits 0; a failure of the benchmark itself, or a process of ours left
running at the end, exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

N_ADAPTERS = 100
KERNELS = 4
PROMPT = "Which fine-tune are you?"
MAX_TOKENS = 4
COLD_GOAL_S = 0.100
REUSE_RATIO_GOAL = 2.0
# Small, fast servers as in the tests: float32 like the demo weights, no CUDA-graph capture, a small KV cache
VLLM_ARGS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-memory-bytes", "256M")
BASE = "sage-demo-base"


# --- the adapters (child process: torch) ---------------------------------------------------------------------


def build_adapters(home: Path, n: int) -> dict[str, str]:
    """Write ``n`` fine-tunes ``team_000``... under ``home`` and return each one's first word.

    Every adapter is rank 8 on the demo's seven projections (small random weights, so vLLM loads and caches
    a full-size adapter), plus one rank-1 direction in the last layer's down_proj: its input direction is the
    MLP activation at the prompt's last position, its output the lm_head row of a word of its own. So the
    first answer token is that word, by a wide margin, whatever small differences vLLM's kernels make."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: more threads only fight the vLLM servers for the 2 cores
    base = home / "models" / BASE
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_dict=True, return_tensors="pt")["input_ids"]
    layers = model.model.layers
    last = layers[-1].mlp.down_proj
    seen: dict[str, torch.Tensor] = {}
    hooks = [module.register_forward_hook(lambda _m, inp, _out, key=key: seen.__setitem__(key, inp[0][0, -1].clone()))
             for key, module in (("m", last), ("h", model.model.norm))]
    with torch.no_grad():
        out = model(ids)
    for hook in hooks:
        hook.remove()
    m_last, h_last = seen["m"], seen["h"]  # the MLP activation and the residual before the final norm
    base_first = int(out.logits[0, -1].argmax())
    config = json.loads((home / "finetune_output" / "demo_expert" / "lora_weights" / "adapter_config.json").read_text())
    rank, scaling = int(config["r"]), config["lora_alpha"] / config["r"]
    norm_w, head = model.model.norm.weight.detach(), model.lm_head.weight.detach()
    # candidate words: printable ASCII tokens of two characters or more, not special, not the base's first word
    special = set(tok.all_special_ids)
    words = {t: tok.decode([t]).strip() for t in range(len(head)) if t not in special and t != base_first}
    words = {t: w for t, w in words.items() if w.isascii() and w.isprintable() and len(w) >= 2 and " " not in w}
    tokens = torch.tensor(list(words))
    # a push along d, large next to the residual, leaves RMSNorm(residual) ~ sqrt(hidden) * d * norm_w: find,
    # for every word at once, the direction that makes it win by the widest margin (capped: enough is enough)
    d = (head[tokens] * norm_w).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([d], lr=0.05)
    for _ in range(100):
        unit = d / d.norm(dim=1, keepdim=True)
        logits = (unit * norm_w * head.shape[1] ** 0.5) @ head.T
        margin = (logits.gather(1, tokens[:, None])
                  - logits.scatter(1, tokens[:, None], float("-inf")).max(1, keepdim=True).values).squeeze(1)
        optimizer.zero_grad()
        (-margin.clamp(max=5.0).sum()).backward()
        optimizer.step()
    directions, margin = (d / d.norm(dim=1, keepdim=True)).detach(), margin.detach()
    push = 40.0 * float(h_last.norm())
    chosen: list[tuple[int, str, torch.Tensor]] = []
    for row in sorted(range(len(tokens)), key=lambda r: -float(margin[r])):
        t, w = int(tokens[row]), words[int(tokens[row])]
        if float(margin[row]) < 2.0 or any(w.startswith(o) or o.startswith(w) for _, o, _ in chosen):
            continue  # prefix-free: "the answer starts with its word" then names exactly one adapter
        chosen.append((t, w, directions[row]))
    targets = [name for name in ("q_proj", "k_proj", "v_proj", "o_proj") if name in config["target_modules"]]
    mlp = [name for name in ("gate_proj", "up_proj", "down_proj") if name in config["target_modules"]]
    result: dict[str, str] = {}
    checked = 0
    for i, (token, word, direction) in enumerate(chosen):  # widest margins first
        if len(result) == n:
            break
        name = f"team_{len(result):03d}"
        tensors = {}
        for li, layer in enumerate(layers):
            modules = [(f"self_attn.{p}", getattr(layer.self_attn, p)) for p in targets]
            modules += [(f"mlp.{p}", getattr(layer.mlp, p)) for p in mlp]
            for path, module in modules:
                out_f, in_f = module.weight.shape
                a = torch.randn(rank, in_f) * 0.01
                b = torch.randn(out_f, rank) * 0.01
                if module is last:
                    a[0] = m_last / m_last.norm()
                    b[:, 0] = direction * push / (scaling * float(m_last.norm()))
                key = f"base_model.model.model.layers.{li}.{path}"
                tensors[f"{key}.lora_A.weight"] = a.contiguous()
                tensors[f"{key}.lora_B.weight"] = b.contiguous()
        if checked < 3 or i % 10 == 0:  # the analytic choice above, checked on the real forward pass now and then
            checked += 1
            key = f"base_model.model.model.layers.{len(layers) - 1}.mlp.down_proj"
            delta = scaling * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
            last.weight.data += delta
            with torch.no_grad():
                got = int(model(ids).logits[0, -1].argmax())
            last.weight.data -= delta
            if got != token:
                raise RuntimeError(f"adapter for {word!r} answers token {got}, not {token}")
        folder = home / "finetune_output" / name
        (folder / "lora_weights").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "lora_weights" / "adapter_model.safetensors"))
        (folder / "lora_weights" / "adapter_config.json").write_text(json.dumps(config, indent=2))
        (folder / "finetune_meta.json").write_text(json.dumps({"model": BASE, "task": "load test", "lora_r": rank}))
        result[name] = word
    if len(result) < n:
        raise RuntimeError(f"only {len(result)} distinct first words found for {n} adapters")
    return result


# --- kernels -----------------------------------------------------------------------------------------------


CELL = ("get_ipython().run_cell_magic('sage', {line!r}, {prompt!r})\n"
        "print('@@' + __import__('json').dumps({{'text': str(_hb), 'ttft': _hb.metrics['ttft_s'], "
        "'server': _hb.metrics['server']}}))")


class Kernel:
    """One real kernel (jupyter_client) with the magics loaded, asking one fine-tune per cell."""

    def __init__(self, env: dict[str, str]) -> None:
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env)
        self.client = self.km.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)
        reply = self.client.execute_interactive("%load_ext sage_magic", timeout=60)
        assert reply["content"]["status"] == "ok"

    def ask(self, name: str) -> dict:
        """Seconds from sending the cell to the first output carrying answer text (what a person sees), the
        cell's whole time, the answer, the model's own time to first token, or the cell's error."""
        line = f"--finetune-model {name} --new-chat --max-tokens {MAX_TOKENS} -o _hb"
        sent = time.monotonic()
        msg_id = self.client.execute(CELL.format(line=line, prompt=PROMPT))
        first, printed, error = None, "", None
        while True:
            msg = self.client.get_iopub_msg(timeout=600)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if first is None and kind in ("display_data", "update_display_data"):
                plain, page = content["data"].get("text/plain", ""), content["data"].get("text/html", "")
                if ("▍" in page and plain.strip()) or "tok/s" in plain:
                    first = time.monotonic() - sent
            elif kind == "stream":
                printed += content["text"]
            elif kind == "error":
                error = f"{content['ename']}: {content['evalue']}"
            elif kind == "status" and content["execution_state"] == "idle":
                break
        done = time.monotonic() - sent
        result = {"name": name, "first": first, "cell": done, "error": error}
        for out_line in printed.splitlines():
            if out_line.startswith("@@"):
                result.update(json.loads(out_line[2:]))
        if error is None and "text" not in result:
            result["error"] = f"no answer printed: {printed[-300:]!r}"
        return result

    def run(self, code: str) -> str:
        printed: list[str] = []
        reply = self.client.execute_interactive(code, timeout=120, output_hook=lambda m: printed.append(
            m["content"].get("text", "") or m["content"].get("data", {}).get("text/plain", "")))
        if reply["content"]["status"] != "ok":
            raise RuntimeError(f"{code!r} failed in the kernel")
        return "".join(printed)

    def close(self) -> None:
        self.client.stop_channels()
        self.km.shutdown_kernel(now=False)


# --- figures -----------------------------------------------------------------------------------------------


def tree_rss(pid: int | None) -> int:
    """RSS of a vLLM server: its API server and every process under it (engine core, worker)."""
    import psutil

    if pid is None:
        return 0
    leader = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [leader, *leader.children(recursive=True)])


def lora_sizing(pid: int) -> dict[str, str]:
    """The --max-loras / --max-cpu-loras / --max-lora-rank the server runs with (vLLM's defaults when absent)."""
    import psutil

    argv = psutil.Process(pid).cmdline()
    found = {"--max-loras": "1 (vLLM default)", "--max-cpu-loras": "= --max-loras (vLLM default)",
             "--max-lora-rank": "16 (vLLM default)"}
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in found:
            found[key] = value or (argv[i + 1] if i + 1 < len(argv) else "?")
    return found


def check(answer: dict, words: dict[str, str]) -> str | None:
    """Why this answer is not its adapter's (None: it is)."""
    if answer["error"]:
        return answer["error"]
    text = answer["text"].lstrip()
    if not text.startswith(words[answer["name"]]):
        others = [n for n, w in words.items() if text.startswith(w)]
        whose = f"the word of {others[0]}" if others else "no adapter's word"
        return f"{answer['name']} answered {text[:40]!r}: {whose}"
    return None


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def reuse_p50(manager, name: str, runs: int) -> float:
    """Median of serve_finetune(name) on a running server that already serves it (a lease taken, released)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        lease = manager.serve_finetune(name)
        times.append(time.perf_counter() - started)
        lease.release()
    return statistics.median(times)


def owner_check_figures(registry, server_id: str, runs: int = 20) -> tuple[int, int, float, float]:
    """What the supervisor's owner check (4 times a second) costs on the record as it is now: each process
    looked up once (live_owners) against a lookup per lease (the way before)."""
    from sage_magic.serving.registry import live_owners

    owners = registry.get(server_id).owners
    started = time.perf_counter()
    for _ in range(runs):
        live_owners(owners)
    once = (time.perf_counter() - started) / runs
    started = time.perf_counter()
    for _ in range(runs):
        [o for o in owners if o.alive()]
    each = (time.perf_counter() - started) / runs
    return len(owners), len({(o.pid, o.created) for o in owners}), once, each


def sage_cli(env: dict[str, str], *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "sage_magic.cli.main", *args], capture_output=True, text=True,
                         env=env, timeout=120, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"sage {' '.join(args)} failed: {out.stderr}")
    return time.perf_counter() - started, out.stdout


def ours(runtime: Path) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
        except psutil.Error:
            continue
        if "SAGE_SERVER_ID" in env and env.get("SAGE_RUNTIME_DIR") == str(runtime):
            found.append(proc)
    return found


# --- the run -------------------------------------------------------------------------------------------------


def prepare_home(source: str | None, home: Path) -> None:
    if source and (Path(source) / "finetune_output" / "demo_expert").is_dir():
        shutil.copytree(source, home)
        return
    subprocess.run([sys.executable, "-m", "sage_magic.cli.main", "finetune", "demo", "--home", str(home)], check=True,
                   stdin=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="fewer random asks (CI)")
    parser.add_argument("--home", default=os.environ.get("SAGE_TEST_DEMO_HOME") or os.environ.get("SAGE_HOME"),
                        help="a demo home to copy (default: SAGE_TEST_DEMO_HOME, else SAGE_HOME, else built)")
    parser.add_argument("--adapters", type=int, default=N_ADAPTERS)
    parser.add_argument("--vllm-arg", action="append", default=[], help="extra vLLM arguments, shell-quoted")
    parser.add_argument("--build-adapters", nargs=2, metavar=("HOME", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_adapters:  # the child: torch lives here only
        print(json.dumps(build_adapters(Path(args.build_adapters[0]), int(args.build_adapters[1]))))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="hundred-bench-"))
    runtime = Path(tempfile.mkdtemp(prefix="sage-h-", dir="/tmp"))  # short: Unix socket paths
    home = tmp / "home"
    kernels: list[Kernel] = []
    manager = None
    failed = False
    try:
        prepare_home(args.home, home)
        started = time.monotonic()
        built = subprocess.run([sys.executable, __file__, "--build-adapters", str(home), str(args.adapters)],
                               capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL)
        if built.returncode != 0:
            raise RuntimeError(f"building the adapters failed:\n{built.stderr[-2000:]}")
        words: dict[str, str] = json.loads(built.stdout.strip().splitlines()[-1])
        names = sorted(words)
        one = home / "finetune_output" / names[0] / "lora_weights" / "adapter_model.safetensors"
        print(f"{len(names)} fine-tunes of {BASE} built in {time.monotonic() - started:.1f} s (child process), "
              f"{one.stat().st_size / 1024:.0f} KiB of weights each; first words e.g. "
              + ", ".join(f"{n}: {words[n]!r}" for n in names[:3]))

        extra = tuple(a for chunk in args.vllm_arg for a in shlex.split(chunk))
        from sage_magic.core.config import Settings
        from sage_magic.serving.manager import Manager

        settings = Settings.from_env(environ={}, home=home, runtime_dir=runtime, vllm_args=VLLM_ARGS + extra,
                                     ready_timeout=600.0)
        manager = Manager(settings)
        started = time.monotonic()
        anchor = manager.serve_finetune(names[0])  # held to the end: the server outlives every kernel's turn
        record = manager.registry.get(anchor.endpoint.server_id)
        print(f"base server {record.id} ready in {time.monotonic() - started:.1f} s; LoRA sizing: "
              + ", ".join(f"{k} {v}" for k, v in lora_sizing(record.pid).items()))
        floor_reuse = reuse_p50(manager, names[0], 30)
        floor_size = (manager.registry.servers / f"{record.id}.json").stat().st_size

        env = {k: v for k, v in os.environ.items() if not k.startswith("SAGE_")}
        env.update(SAGE_HOME=str(home), SAGE_RUNTIME_DIR=str(runtime), HF_HUB_OFFLINE="1",
                   SAGE_VLLM_ARGS=shlex.join(VLLM_ARGS + extra))
        kernels = [Kernel(env) for _ in range(KERNELS)]
        for kernel in kernels:  # each kernel's first cell pays its imports: not a cold adapter's cost
            answer = kernel.ask(names[0])
            if check(answer, words):
                raise RuntimeError(f"warm-up: {check(answer, words)}")
        rss = [(0, tree_rss(record.pid))]  # (adapters asked, RSS)

        # in turn: kernel i % 4 asks fine-tune i for the first time (cold), then again (warm), one cell at a time
        pairs, wrong = [], []
        for i, name in enumerate(names[1:], start=1):
            kernel = kernels[i % KERNELS]
            cold, warm = kernel.ask(name), kernel.ask(name)
            wrong += [why for why in (check(cold, words), check(warm, words)) if why]
            if cold["first"] is not None and warm["first"] is not None:
                pairs.append((cold, warm))
            if i % 10 == 0 or i == len(names) - 1:
                rss.append((i, tree_rss(record.pid)))
        asked = 2 * (len(names) - 1)

        # at random: the four kernels at once, each its own sequence of fine-tunes
        per_kernel = 25 if args.short else 60
        random_answers: list[dict] = []
        lock = threading.Lock()

        def worker(kernel: Kernel, seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(per_kernel):
                name = rng.choice(names)
                try:
                    answer = kernel.ask(name)
                except Exception as error:  # a kernel that stops answering counts as errors, not a lost thread
                    answer = {"name": name, "first": None, "error": f"{type(error).__name__}: {error}"}
                with lock:
                    random_answers.append(answer)

        started = time.monotonic()
        threads = [threading.Thread(target=worker, args=(k, seed)) for seed, k in enumerate(kernels)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        random_seconds = time.monotonic() - started
        wrong += [why for why in map(lambda a: check(a, words), random_answers) if why]
        asked += len(random_answers)
        servers_used = {a.get("server") for a in random_answers + [c for pair in pairs for c in pair]} - {None}
        logs = list((runtime / "logs").glob("*.log"))

        print()
        print(f"errors or wrong answers: {len(wrong)} of {asked + KERNELS} asks (goal 0)")
        for why in wrong[:5]:
            print(f"  {why}")
        print(f"servers started: {len(logs)}, answering from {len(servers_used)} (goal 1)")
        colds = [c["first"] for c, _ in pairs]
        warms = [w["first"] for _, w in pairs]
        extra_s = [c["first"] - w["first"] for c, w in pairs]
        model_extra = [c["ttft"] - w["ttft"] for c, w in pairs if c.get("ttft") is not None and w.get("ttft")]
        print(f"first answer drawn, cold adapter vs the same adapter warm ({len(pairs)} pairs, one cell at a time): "
              f"cold p50 {ms(statistics.median(colds))}, warm p50 {ms(statistics.median(warms))} -> "
              f"+{ms(statistics.median(extra_s))} p50, +{ms(p(extra_s, 0.95))} p95, +{ms(max(extra_s))} max "
              f"(goal <= +{ms(COLD_GOAL_S)}: {'met' if statistics.median(extra_s) <= COLD_GOAL_S else 'MISSED'} "
              "at p50)")
        if model_extra:
            print(f"  of which the model's own time to first token: {statistics.median(model_extra) * 1000:+.0f} ms "
                  "p50 (vLLM loading the adapter into its cache and slot); the rest is the lease and load_lora_adapter")
        randoms = [a["first"] for a in random_answers if a["first"] is not None]
        print(f"at random, {KERNELS} kernels at once: {len(random_answers)} asks in {random_seconds:.1f} s "
              f"({len(random_answers) / random_seconds:.1f} answers/s), first answer drawn p50 "
              f"{ms(statistics.median(randoms))}, p95 {ms(p(randoms, 0.95))} (one cell at a time, warm: "
              f"{ms(statistics.median(warms))}; reported)")
        (_, r0), (x1, r1) = rss[0], rss[-1]
        slope = statistics.linear_regression([x for x, _ in rss], [r for _, r in rss]).slope if len(rss) > 2 else 0
        print(f"vLLM RSS: {r0 / 2**20:.0f} MiB with 1 adapter asked, {r1 / 2**20:.0f} MiB with {x1 + 1} -> "
              f"{slope / 1024:.0f} KiB per adapter asked (fit over {len(rss)} samples; floor: the adapter's own "
              f"weights, {one.stat().st_size / 1024:.0f} KiB, ratio {slope / one.stat().st_size:.1f}x; reported). "
              f"How many stay cached is --max-cpu-loras (above)")

        final = manager.registry.get(record.id)
        size = (manager.registry.servers / f"{record.id}.json").stat().st_size
        reuse = reuse_p50(manager, names[-1], 30)
        leases, processes, once, each = owner_check_figures(manager.registry, record.id)
        print(f"registry: {len(final.adapters)} adapters, {leases} leases from {processes} processes; record "
              f"{size / 1024:.1f} KiB (1 adapter: {floor_size / 1024:.1f} KiB), one rewrite per load or lease")
        print(f"  warm reuse of serve_finetune p50: {ms(reuse)} with {len(final.adapters)} adapters vs "
              f"{ms(floor_reuse)} with 1 -> {reuse / floor_reuse:.2f}x (goal <= {REUSE_RATIO_GOAL:g}x)")
        print(f"  the supervisor's owner check (4x a second): {once * 1000:.2f} ms looking up each of the {processes} "
              f"processes once, against {each * 1000:.2f} ms for a lookup per lease ({each / once:.0f}x)")
        took, table = sage_cli(env, "ps")
        print(f"`sage ps` with {len(final.adapters)} adapters: {ms(took)}, "
              f"{max(len(line) for line in table.splitlines())} columns wide:")
        print("\n".join(f"    {line}" for line in table.splitlines()))
        status = kernels[0].run("%sage status")
        print("`%sage status` in a kernel (text/plain):")
        print("\n".join(f"    {line}" for line in status.strip().splitlines()))
        took, listed = sage_cli(env, "ps", "--json")
        print(f"`sage ps --json` (and the sidebar's GET /sage-magic/servers): {len(listed) / 1024:.1f} KiB, every "
              f"adapter named; the sidebar folds them into a collapsed list")
    except Exception as error:  # the benchmark itself failed: say why, clean up, exit 1
        failed = True
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
    finally:
        for kernel in kernels:
            kernel.close()
        if manager is not None:
            manager.close(wait=True)
        left = ours(runtime)
        if left:
            failed = True
            print(f"left running: {[p.pid for p in left]}", file=sys.stderr)
            for proc in left:
                proc.kill()
        if not failed:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(runtime, ignore_errors=True)
        else:
            print(f"kept for a look: {tmp} {runtime}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
