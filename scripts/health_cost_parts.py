"""The health figures' cost on the `cpu` preset, by parts, in CPU seconds of this process (what the load of other processes
does not inflate): a plain step (health off), the per-step bookkeeping (_clip_gradients' norm is computed by clipping anyway;
_take_update, _log_health, _step_figures), and the extra of a health step (_health_watch around the update).
Run: python scripts/health_cost_parts.py [muon|adamw]   (issue 27; prints one JSON object)"""
import os, sys, time, statistics, json, tempfile, contextlib
from pathlib import Path
import torch
from craft.training import Trainer, resolve_config
from craft.machine import cpu_name, cpu_cores
optimizer = sys.argv[1] if len(sys.argv) > 1 else 'muon'
root = Path(tempfile.mkdtemp())
t = Trainer(resolve_config('cpu', out=root / 'x', progress=False, device='cpu', optimizer=optimizer))
torch.set_num_threads(t.profile.choice.threads or 1)
t._begin()
def cpu(f, n):
    start = time.process_time()
    for _ in range(n): f()
    return (time.process_time() - start) / n
for _ in range(3): t.train_step(); t._log_health()
t.cfg.health = False; plain = [cpu(t.train_step, 1) for _ in range(12)]; t.cfg.health = True
loss, norm = torch.tensor(2.5), torch.tensor(0.8)
def bookkeeping(): t._take_update(loss, norm); t._log_health(); t._step_figures()
per_step = statistics.median(cpu(bookkeeping, 2000) for _ in range(5))
x, _ = next(t.train_batches)
_, l = t.raw_model(x, x); l.backward()           # gradients present, as at the update
t._health_due = lambda: True
def watched():
    with t._health_watch(x): pass
    t.pending_health = None
health_step = statistics.median(cpu(watched, 1) for _ in range(12))
step = statistics.median(plain)
interval = t.cfg.eval_interval
print(json.dumps(dict(machine=f"{cpu_name()}, {cpu_cores()} cores", optimizer=optimizer, threads=torch.get_num_threads(), batch=t.cfg.batch_size,
    plain_step_cpu_ms=round(1000 * step, 2), bookkeeping_per_step_us=round(1e6 * per_step, 1), health_step_extra_cpu_ms=round(1000 * health_step, 2),
    eval_interval=interval, overhead_pct=round(100 * (per_step + health_step / interval) / step, 4), load_1min=round(os.getloadavg()[0], 1)), indent=1))
t.close()
