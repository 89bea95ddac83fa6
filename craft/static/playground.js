// The playground of `craft serve`: sends the settings to POST /v1/generate, streams the text in (Server-Sent
// Events), and shows for any generated character what the model saw: the probabilities it was drawn from.
'use strict';
const $ = (id) => document.getElementById(id);
const SETTINGS = {  // slider id -> how its value reads
  temperature: (v) => (v == 0 ? '0 (greedy)' : v),
  top_k: (v) => (v == 0 ? 'off' : v),
  top_p: (v) => (v == 1 ? 'off' : v),
  min_p: (v) => (v == 0 ? 'off' : v),
  repetition_penalty: (v) => (v == 1 ? 'off' : v),
  max_new_tokens: (v) => `${v} characters`,
};
const TOP = 10;          // alternatives asked for at each character
let steps = [];          // what the model saw at each generated character: {token, prob, top: [{token, prob}]}
let selected = -1, follow = true, controller = null;

const visible = (ch) => ({ ' ': '␣', '\n': '⏎', '\t': '⇥' })[ch] ?? ch;
const percent = (p) => (p >= 0.001 ? `${(100 * p).toFixed(1)}%` : '<0.1%');
const count = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : `${(n / 1e3).toFixed(1)}K`);

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

async function loadModel() {
  const info = await (await fetch('/v1/model')).json();
  const run = info.run, loss = (x) => (x == null ? null : x.toFixed(3));
  $('model').textContent = [run.name ?? 'model', `${count(info.parameters)} parameters`, run.step != null && `step ${run.step}`,
    loss(run.train_loss) && `train loss ${loss(run.train_loss)}`, loss(run.val_loss) && `val loss ${loss(run.val_loss)}`,
    `${info.device}, ${info.dtype}`].filter(Boolean).join(' · ');
  $('top_k').max = info.vocab_size;
  $('max_new_tokens').max = Math.min(info.limits.max_new_tokens, 2000);
  $('prompt').maxLength = info.limits.max_prompt_chars;
  showSettings();
}

function showSettings() {
  for (const [id, read] of Object.entries(SETTINGS)) document.querySelector(`output[for=${id}]`).textContent = read($(id).value);
}

function request(seed) {
  // The body as JSON; the seed is spliced in as digits, since a JavaScript number cannot hold every 63-bit seed.
  const body = { prompt: $('prompt').value, stream: true, top_probs: TOP };
  for (const id of Object.keys(SETTINGS)) body[id] = Number($(id).value);
  return JSON.stringify(body).slice(0, -1) + `,"seed":${seed}}`;
}

async function readEvents(response, onEvent) {
  // Server-Sent Events: blocks separated by a blank line, each an `event:` line and a one-line JSON `data:`.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (let end; (end = buffer.indexOf('\n\n')) >= 0; buffer = buffer.slice(end + 2)) {
      const block = buffer.slice(0, end);
      onEvent(/^event: (.*)$/m.exec(block)[1], JSON.parse(/^data: (.*)$/m.exec(block)[1]));
    }
  }
}

function onEvent(name, data) {
  if (name === 'chunk') {
    const spans = [...data.text].map((ch, i) => {
      const span = document.createElement('span');
      span.textContent = ch;
      span.dataset.i = steps.length;
      steps.push(data.probs[i]);
      return span;
    });
    $('generated').append(...spans);
    if (follow) select(steps.length - 1);
  } else if (name === 'done') {
    const t = data.timing;
    status(`${data.generated_tokens} characters in ${t.total_s.toFixed(2)} s, ${Math.round(t.tokens_per_s)} characters/s; seed ${data.seed}`);
  } else status(data.error, true);
}

async function generate() {
  const seed = $('seed').value.trim() || String(Math.floor(Math.random() * 1e6));
  if (!/^\d{1,19}$/.test(seed)) return status('the seed is a whole number (or leave it empty for a random one)', true);
  steps = []; selected = -1; follow = true;
  $('prompt-text').textContent = $('prompt').value;
  $('generated').replaceChildren();
  $('sees').hidden = true;
  $('generate').disabled = true; $('stop').disabled = false;
  status('generating…');
  controller = new AbortController();
  try {
    const response = await fetch('/v1/generate', { method: 'POST', body: request(seed), signal: controller.signal,
                                                   headers: { 'content-type': 'application/json' } });
    if (!response.ok) throw new Error((await response.json()).error);
    await readEvents(response, onEvent);
  } catch (e) {
    status(e.name === 'AbortError' ? `stopped after ${steps.length} characters; seed ${seed}` : e.message, e.name !== 'AbortError');
  } finally {
    $('generate').disabled = false; $('stop').disabled = true;
  }
}

function select(i) {
  if (i < 0 || i >= steps.length) return;
  document.querySelector('#generated .selected')?.classList.remove('selected');
  const span = $('generated').children[i];
  span.classList.add('selected');
  selected = i;
  const text = $('prompt').value + steps.slice(0, i).map((s) => s.token).join('');
  $('position').textContent = `character ${i + 1} of ${steps.length}`;
  $('context').innerHTML = '';
  const shown = document.createElement('span'), mark = document.createElement('mark');
  shown.className = 'shown';
  shown.textContent = '…' + [...text.slice(-40)].map(visible).join('');
  mark.textContent = visible(steps[i].token);
  $('context').append(shown, mark);
  drawChart(steps[i]);
  $('sees').hidden = false; $('hint').hidden = true;
}

function drawChart(step) {
  const rows = step.top.some((t) => t.token === step.token) ? step.top : [...step.top, { token: step.token, prob: step.prob }];
  const largest = Math.max(...rows.map((t) => t.prob));
  const cells = rows.flatMap((t) => {
    const char = document.createElement('span'), bar = document.createElement('div'), pct = document.createElement('span');
    char.className = 'char'; char.textContent = visible(t.token);
    bar.className = t.token === step.token ? 'bar chosen' : 'bar';
    bar.style.width = `${(100 * t.prob) / largest}%`;
    bar.setAttribute('role', 'listitem');
    bar.title = `${JSON.stringify(t.token)}: ${percent(t.prob)}`;
    pct.className = 'pct'; pct.textContent = percent(t.prob);
    return [char, bar, pct];
  });
  const rest = 1 - rows.reduce((sum, t) => sum + t.prob, 0);
  if (rest > 0.0005) {
    const others = document.createElement('span');
    others.className = 'others';
    others.style.gridColumn = '1 / -1';
    others.textContent = `all other characters: ${percent(rest)}`;
    cells.push(others);
  }
  $('chart').replaceChildren(...cells);
}

$('generated').addEventListener('click', (e) => {
  if (e.target.dataset.i === undefined) return;
  follow = false;
  select(Number(e.target.dataset.i));
});
$('previous').addEventListener('click', () => { follow = false; select(selected - 1); });
$('next').addEventListener('click', () => { follow = false; select(selected + 1); });
$('generate').addEventListener('click', generate);
$('stop').addEventListener('click', () => controller?.abort());
for (const id of Object.keys(SETTINGS)) $(id).addEventListener('input', showSettings);
showSettings();
loadModel().catch((e) => status(`cannot reach the server: ${e.message}`, true));
