// The playground of `craft serve`: sends the settings to POST /v1/generate, streams the text in (Server-Sent
// Events), and shows for any generated character what the model saw: the probabilities it was drawn from.
'use strict';
const $ = (id) => document.getElementById(id);
let controls = [];           // the sliders, as GET /v1/settings describes them: name, label, doc, min, max, step, value, marks
const TOP = 10;              // alternatives asked for at each character
const MAX_SEED = 2n ** 63n;  // seeds are below 2**63; sent as a string of digits, which every JSON parser keeps exactly
let samples = [];            // per sample: {prompt, steps: what the model saw at each generated character, box: its element}
let selected = null, follow = true, controller = null, vocabulary = null;
let key = sessionStorage.getItem('craft-api-key') || '';

const visible = (ch) => ({ ' ': '␣', '\n': '⏎', '\t': '⇥' })[ch] ?? ch;
const percent = (p) => (p >= 0.001 ? `${(100 * p).toFixed(1)}%` : '<0.1%');
const count = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : `${(n / 1e3).toFixed(1)}K`);
const headers = (more = {}) => (key ? { ...more, authorization: `Bearer ${key}` } : more);

function status(text, error = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', error);
}

async function loadModel() {
  const response = await fetch('/v1/model', { headers: headers() });
  if (response.status === 401) {
    $('key-row').hidden = false;
    $('model').textContent = 'this server needs an API key';
    return status(key ? 'that API key is not this server\'s: type the key it was started with' : 'type the API key this server was started with, then Use', true);
  }
  const info = await response.json();
  const run = info.run, loss = (x) => (x == null ? null : x.toFixed(3));
  $('key-row').hidden = !key;
  $('model').textContent = [run.name ?? 'model', `${count(info.parameters)} parameters`, run.step != null && `step ${run.step}`,
    loss(run.train_loss) && `train loss ${loss(run.train_loss)}`, loss(run.val_loss) && `val loss ${loss(run.val_loss)}`,
    `${info.device}, ${info.dtype}`].filter(Boolean).join(' · ');
  vocabulary = new Set(info.vocabulary);
  if (!controls.length) {                                         // once: a new API key keeps the sliders as they are
    controls = await (await fetch('/v1/settings', { headers: headers() })).json();
    buildSliders();
  }
  $('prompt').maxLength = info.limits.max_prompt_chars;
  for (const option of $('num_samples').options) option.disabled = Number(option.value) > info.limits.max_samples;
  status('');
  showSettings();
}

function buildSliders() {
  // One labelled slider per control, from the server's table: nothing about a control is written in this page.
  $('sliders').replaceChildren(...controls.map((c) => {
    const div = document.createElement('div'), label = document.createElement('label');
    const output = document.createElement('output'), input = document.createElement('input');
    div.className = 'slider'; div.title = c.doc;
    label.htmlFor = c.name; label.textContent = c.label;
    output.htmlFor = c.name;
    Object.assign(input, { type: 'range', id: c.name, min: c.min, max: c.max, step: c.step, value: c.value });
    input.addEventListener('input', showSettings);
    div.append(label, output, input);
    return div;
  }));
}

function showSettings() {
  // Each slider's value as it reads: its meaning where it has one ('off', '0 (greedy)').
  for (const c of controls) document.querySelector(`output[for=${c.name}]`).textContent = c.marks[String(Number($(c.name).value))] ?? $(c.name).value;
}

function problem(prompt, seed) {
  // What keeps this request from running, in the page's words (null: nothing); the server checks it all again.
  if (!/^\d*$/.test(seed) || (seed && BigInt(seed) >= MAX_SEED)) return 'the seed is a whole number below 2^63 (or leave it empty for a random one)';
  const unknown = vocabulary ? [...new Set([...prompt].filter((ch) => !vocabulary.has(ch)))] : [];
  if (unknown.length && !$('drop').checked) {
    return `these characters are not in the model's alphabet: ${unknown.map(visible).join(' ')} — remove them, or tick 'drop unknown characters'`;
  }
  if (prompt.length === 0 || unknown.length === [...new Set(prompt)].length) {
    return 'the prompt is empty: type some text for the model to continue (a single newline will do)';
  }
  return null;
}

function stopStrings() {
  // "\n\n | THE END" -> ["\n\n", "THE END"]: strings separated by |, with \n for a newline and \t for a tab.
  return $('stop-strings').value.split('|').map((s) => s.trim().replaceAll('\\n', '\n').replaceAll('\\t', '\t')).filter((s) => s);
}

function request(prompt, seed) {
  const body = { prompt, stream: true, top_probs: TOP, seed, num_samples: Number($('num_samples').value),
                 on_unknown: $('drop').checked ? 'drop' : 'error' };
  for (const c of controls) body[c.name] = Number($(c.name).value);
  const stop = stopStrings();
  if (stop.length) body.stop = stop;
  return JSON.stringify(body);
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

function sampleBox(i, n, prompt) {
  // One sample's text: a label when there are several, the prompt (greyed), and the generated characters.
  const box = document.createElement('div'), label = document.createElement('p');
  const shown = document.createElement('span'), generated = document.createElement('span');
  box.className = 'sample'; label.className = 'label'; shown.className = 'prompt-text'; generated.className = 'generated';
  label.textContent = `sample ${i + 1}`; label.hidden = n === 1;
  shown.textContent = prompt;
  generated.dataset.s = i;
  box.append(label, shown, generated);
  return box;
}

function atBottom(box) { return box.scrollHeight - box.scrollTop - box.clientHeight < 24; }

function onEvent(name, data) {
  if (name === 'chunk') {
    const sample = samples[data.sample], output = $('output');
    const spans = [...data.text].map((ch, i) => {
      const span = document.createElement('span');
      span.textContent = ch;
      span.dataset.i = sample.steps.length;
      sample.steps.push(data.probs[i]);
      return span;
    });
    sample.box.querySelector('.generated').append(...spans);
    if (follow) {                                                  // the bars and the box follow the text, till the reader looks elsewhere
      select(data.sample, sample.steps.length - 1);
      output.scrollTop = output.scrollHeight;
    }
  } else if (name === 'done') {
    const t = data.timing;
    status(`${data.generated_tokens} characters in ${t.total_s.toFixed(2)} s, ${Math.round(t.tokens_per_s)} characters/s; seed ${data.seed}`);
  } else status(data.error, true);
}

async function generate(prompt = $('prompt').value) {
  if (controller) return;                                       // one at a time (Ctrl+Enter while generating does nothing)
  const seed = $('seed').value.trim() || String(Math.floor(Math.random() * 1e6));
  const why = problem(prompt, $('seed').value.trim());
  if (why) return status(why, true);
  const n = Number($('num_samples').value);
  const used = $('drop').checked ? [...prompt].filter((ch) => !vocabulary || vocabulary.has(ch)).join('') : prompt;
  samples = Array.from({ length: n }, (_, i) => ({ prompt: used, steps: [], box: sampleBox(i, n, used) }));
  selected = null; follow = true;
  $('output').replaceChildren(...samples.map((s) => s.box));
  $('sees').hidden = true;
  $('generate').disabled = true; $('stop').disabled = false; $('copy').disabled = true; $('continue').disabled = true;
  status('generating…');
  controller = new AbortController();
  try {
    const response = await fetch('/v1/generate', { method: 'POST', body: request(prompt, seed), signal: controller.signal,
                                                   headers: headers({ 'content-type': 'application/json' }) });
    if (response.status === 401) { $('key-row').hidden = false; throw new Error('this server needs its API key: type it above, then Use'); }
    if (response.status === 429) throw new Error('the server is busy with other requests: try again in a moment');
    if (!response.ok) throw new Error((await response.json()).error);
    await readEvents(response, onEvent);
  } catch (e) {
    const made = samples.reduce((sum, s) => sum + s.steps.length, 0);
    status(e.name === 'AbortError' ? `stopped after ${made} characters; seed ${seed}` : e.message, e.name !== 'AbortError');
  } finally {
    controller = null;
    $('generate').disabled = false; $('stop').disabled = true;
    $('copy').disabled = $('continue').disabled = !samples.some((s) => s.steps.length);
  }
}

function select(s, i) {
  const sample = samples[s];
  if (!sample || i < 0 || i >= sample.steps.length) return;
  document.querySelector('#output .selected')?.classList.remove('selected');
  sample.box.querySelector('.generated').children[i].classList.add('selected');
  selected = { s, i };
  // The context is what the model had read: this sample's prompt as sent, then its own characters before this one.
  const text = sample.prompt + sample.steps.slice(0, i).map((step) => step.token).join('');
  $('position').textContent = `${samples.length > 1 ? `sample ${s + 1}, ` : ''}character ${i + 1} of ${sample.steps.length}`;
  const shown = document.createElement('span'), mark = document.createElement('mark');
  shown.className = 'shown';
  shown.textContent = '…' + [...text].slice(-40).map(visible).join('');
  mark.textContent = visible(sample.steps[i].token);
  $('context').replaceChildren(shown, mark);
  drawChart(sample.steps[i]);
  $('sees').hidden = false;
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

function textUpTo(s, i) {
  // The prompt and the characters of sample `s` up to and including character `i`.
  return samples[s].prompt + samples[s].steps.slice(0, i + 1).map((step) => step.token).join('');
}

async function copyText() {
  const text = samples.map((s, i) => (samples.length > 1 ? `--- sample ${i + 1} ---\n` : '') + textUpTo(i, s.steps.length - 1)).join('\n');
  try { await navigator.clipboard.writeText(text); status(`copied ${text.length} characters`); }
  catch { status('the browser did not let this page copy: select the text and copy it by hand', true); }
}

function continueFromHere() {
  // The text up to the selected character (or the whole of sample 1) becomes the prompt, and generation goes on from it.
  const { s, i } = selected ?? { s: 0, i: samples[0].steps.length - 1 };
  $('prompt').value = textUpTo(s, i).slice(-Number($('prompt').maxLength > 0 ? $('prompt').maxLength : 4096));
  generate();
}

$('output').addEventListener('click', (e) => {
  if (e.target.dataset.i === undefined || e.target.parentElement.dataset.s === undefined) return;
  follow = false;
  select(Number(e.target.parentElement.dataset.s), Number(e.target.dataset.i));
});
$('output').addEventListener('scroll', () => { if (controller && !atBottom($('output'))) follow = false; });   // scrolled up to read
$('previous').addEventListener('click', () => { follow = false; if (selected) select(selected.s, selected.i - 1); });
$('next').addEventListener('click', () => { follow = false; if (selected) select(selected.s, selected.i + 1); });
$('generate').addEventListener('click', () => generate());
$('stop').addEventListener('click', () => controller?.abort());
$('copy').addEventListener('click', copyText);
$('continue').addEventListener('click', continueFromHere);
$('key-save').addEventListener('click', () => {
  key = $('key').value.trim();
  sessionStorage.setItem('craft-api-key', key);
  loadModel().catch((e) => status(`cannot reach the server: ${e.message}`, true));
});
document.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) { e.preventDefault(); generate(); }
});
loadModel().catch((e) => status(`cannot reach the server: ${e.message}`, true));
