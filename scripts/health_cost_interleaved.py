"""Cost of the health figures on the `cpu` preset, side by side in one process.
Two trainers (health on, health off), same seed, stepped alternately (the order flips each round), so that a
busy machine slows both alike. (1) every step: the paired ratio of step times, on vs off; (2) every eval_interval
steps: the health step (extra forward, norms, weight copy) against a plain step of the same trainer.
Overhead = (1) - 1 + ((2) - 1) / eval_interval.
Run: python scripts/health_cost_interleaved.py [PAIRS HEALTH_PAIRS]   (issue 27; default 60 10; prints one JSON object)"""
import os, sys, time, statistics, json, shutil, tempfile
from pathlib import Path
import torch
from craft.training import Trainer, resolve_config
from craft.machine import cpu_name, cpu_cores
pairs_n, health_n = (int(a) for a in sys.argv[1:3]) if len(sys.argv) > 2 else (60, 10)
root = Path(tempfile.mkdtemp())
def make(health): return Trainer(resolve_config('cpu', out=root / f'health-{health}', health=health, progress=False, device='cpu'))
on, off = make(True), make(False)
threads = on.profile.choice.threads or torch.get_num_threads()
torch.set_num_threads(threads)
for t in (on, off): t._begin()
def timed(t, due=None):
    if due is not None: t._health_due = lambda: due
    start, cpu = time.perf_counter(), time.process_time()
    loss = t.train_step(); t._log_health()
    if t.step % t.cfg.log_interval == 0: t.log(train_loss=loss.item(), **t._step_figures())
    cpu_times[id(t), due].append(time.process_time() - cpu)
    return time.perf_counter() - start
import collections
cpu_times = collections.defaultdict(list)
for _ in range(3): timed(on, False); timed(off)   # warm-up
cpu_times.clear()
loads, step_ratios, times_on, times_off = [], [], [], []
for i in range(pairs_n):
    if i % 2: b = timed(off); a = timed(on, False)
    else: a = timed(on, False); b = timed(off)
    step_ratios.append(a / b); times_on.append(a); times_off.append(b); loads.append(os.getloadavg()[0])
health_ratios = []
for i in range(health_n):
    if i % 2: plain = timed(on, False); full = timed(on, True)
    else: full = timed(on, True); plain = timed(on, False)
    health_ratios.append(full / plain); loads.append(os.getloadavg()[0])
step, health = statistics.median(step_ratios), statistics.median(health_ratios)
c_on, c_off, c_health = (cpu_times[id(on), False], cpu_times[id(off), None], cpu_times[id(on), True])
cpu_step = statistics.median(a / b for a, b in zip(c_on[:pairs_n], c_off))   # CPU seconds of this process: what other processes' load does not add
cpu_health = statistics.median(c_health) / statistics.median(c_on)
interval = on.cfg.eval_interval
result = dict(machine=f"{cpu_name()}, {cpu_cores()} cores", threads=threads, dtype=str(on.dtype), batch=on.cfg.batch_size,
              block=on.run.model.block_size, eval_interval=interval, pairs=pairs_n, health_pairs=health_n,
              step_ratio_median=round(step, 4), health_step_ratio_median=round(health, 3),
              overhead_pct=round(100 * ((step - 1) + (health - 1) / interval), 3),
              cpu_step_ratio_median=round(cpu_step, 4), cpu_health_step_ratio=round(cpu_health, 3),
              cpu_overhead_pct=round(100 * ((cpu_step - 1) + (cpu_health - 1) / interval), 3),
              cpu_step_ratio_quartiles=[round(q, 4) for q in statistics.quantiles([a / b for a, b in zip(c_on[:pairs_n], c_off)], n=4)],
              step_ms_on=round(1000 * statistics.median(times_on), 1), step_ms_off=round(1000 * statistics.median(times_off), 1),
              step_ratio_quartiles=[round(q, 4) for q in statistics.quantiles(step_ratios, n=4)],
              load_1min=[round(min(loads), 1), round(max(loads), 1)])
print(json.dumps(result, indent=1))
for t in (on, off): t.close()
shutil.rmtree(root, ignore_errors=True)
