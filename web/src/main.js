// headforge's browser app: pick photos and options, submit a job, follow its progress, then look at
// each head in 3D (textured mesh or Gaussian splats), see the landmarks on the photo and download
// every artifact.

import { ApiError, cancelJob, getApiKey, getBlob, getBytes, getJob, listModels, setApiKey, submitJob } from './api.js';
import { HeadViewer } from './viewer.js';

const $ = (id) => document.getElementById(id);

const els = {
  keyForm: $('key-form'),
  keyInput: $('api-key'),
  keyClear: $('key-clear'),
  keyStatus: $('key-status'),
  keyBadge: $('key-badge'),
  keyDetails: $('key-details'),
  keySummary: document.querySelector('#key-details > summary'),
  form: $('job-form'),
  dropZone: $('drop-zone'),
  files: $('images'),
  fileList: $('file-list'),
  pipeline: $('pipeline'),
  pipelineNote: $('pipeline-note'),
  textureSize: $('texture-size'),
  maxHeads: $('max-heads'),
  splats: $('splats'),
  submit: $('submit'),
  cancel: $('cancel'),
  status: $('status'),
  error: $('error'),
  stages: $('stages'),
  overallWrap: $('overall-wrap'),
  overall: $('overall'),
  overallPct: $('overall-pct'),
  results: $('results'),
  imageTabs: $('image-tabs'),
  photo: $('photo'),
  overlay: $('overlay'),
  showLandmarks: $('show-landmarks'),
  photoSummary: $('photo-summary'),
  headPicker: $('head-picker'),
  resetView: $('reset-view'),
  play: $('play'),
  viewer: $('viewer'),
  viewerStatus: $('viewer-status'),
  facts: $('head-facts'),
  downloads: $('downloads'),
};

const TERMINAL = new Set(['succeeded', 'failed', 'canceled']);

// What to tell people for the API's error codes; the API's own message is always shown as well.
const ERROR_HELP = {
  not_an_image: 'That file is not an image headforge can read. Use a JPEG, PNG or WebP photo.',
  truncated_image: 'That image file is cut short. Try exporting it again.',
  corrupt_image: 'That image file is damaged. Try exporting it again.',
  empty_file: 'That file is empty.',
  invalid_image: 'That image cannot be used.',
  too_many_pixels: 'That image has too many pixels. Resize it and try again.',
  file_too_large: 'That file is too large. Resize or recompress it and try again.',
  too_many_files: 'Too many photos in one job. Send fewer at a time.',
  no_face: 'No face was found in the photo. Use a photo where a face is clearly visible.',
  invalid_option: 'One of the options is not valid.',
  unknown_pipeline: 'That pipeline does not exist on this server.',
  pipeline_unavailable: 'That pipeline is not available on this server.',
  models_missing: 'The server has no models yet. Its operator needs to run `headforge models pull`.',
  unauthorized: 'This server needs an API key. Enter it under "API key" at the top.',
  rate_limited: 'Too many requests.',
  too_many_queued: 'You already have the most jobs this server allows waiting.',
  service_unavailable: 'The service is busy or restarting.',
  job_timeout: 'The job took too long and was stopped.',
  worker_lost: 'The worker processing the job stopped unexpectedly.',
  network_error: 'The server could not be reached.',
};

const state = {
  files: [],
  objectUrls: [],
  job: null,
  pollTimer: null,
  result: null,
  images: [],
  imageIndex: 0,
  headIndex: 0,
  pipelines: [], // the last list from GET /v1/models
};

const viewer = createViewer();

/** The 3D viewer, or a stand-in that explains why there is none (no WebGL2): the rest still works. */
function createViewer() {
  const onStatus = (text) => {
    els.viewerStatus.textContent = text;
  };
  try {
    return new HeadViewer(els.viewer, onStatus);
  } catch (err) {
    const reason = `The 3D view is off: this browser could not start WebGL2 (${err.message || err}). Downloads still work.`;
    onStatus(reason);
    const none = () => onStatus(reason);
    return { clear: none, show: none, setMode: none, resetView: none, togglePlay: () => false };
  }
}

// Scripts (and the browser tests) reach the viewer here, e.g. `await headforgeViewer.seek(1.2)`.
window.headforgeViewer = viewer;
viewer.onAnimation = (available) => {
  els.play.hidden = !available;
  els.play.setAttribute('aria-pressed', 'false');
  els.play.textContent = 'Play expressions';
};

// ---------------------------------------------------------------- API key

function showKeyState(message) {
  els.keyStatus.textContent = message;
  els.keyBadge.textContent = getApiKey() ? '(set)' : '';
}

els.keyInput.value = getApiKey();
showKeyState(getApiKey() ? 'A key is set for this tab.' : 'No key set.');
els.keyForm.addEventListener('submit', (event) => {
  event.preventDefault();
  setApiKey(els.keyInput.value.trim());
  showKeyState(els.keyInput.value.trim() ? 'Key saved for this tab.' : 'No key set.');
  if (getApiKey()) {
    els.keyDetails.open = false;
    els.keySummary.focus();
  }
  loadModels();
});
els.keyClear.addEventListener('click', () => {
  els.keyInput.value = '';
  setApiKey('');
  showKeyState('Key forgotten.');
});

// ---------------------------------------------------------------- pipelines

async function loadModels() {
  let body;
  try {
    body = await listModels();
  } catch {
    return; // The form still works with the default pipeline; submitting reports real errors.
  }
  const list = Array.isArray(body) ? body : (body.pipelines ?? body.models ?? []);
  const entries = (Array.isArray(list) ? list : Object.entries(list).map(([name, v]) => ({ name, ...v })))
    .filter((p) => p && typeof p.name === 'string');
  if (!entries.length) return;
  const previous = els.pipeline.value;
  els.pipeline.replaceChildren();
  for (const p of entries) {
    const option = document.createElement('option');
    option.value = p.name;
    const available = p.available !== false;
    option.disabled = !available;
    option.textContent = available ? p.name : `${p.name} (unavailable)`;
    if (!available && (p.reason || p.message)) option.title = p.reason || p.message;
    els.pipeline.append(option);
  }
  const preferred = entries.find((p) => p.name === previous && p.available !== false)
    ?? entries.find((p) => p.default && p.available !== false)
    ?? entries.find((p) => p.available !== false);
  if (preferred) els.pipeline.value = preferred.name;
  state.pipelines = entries;
  describePipeline();
}

/** Show the chosen pipeline's description from the last GET /v1/models. */
function describePipeline() {
  const p = state.pipelines.find((e) => e.name === els.pipeline.value);
  els.pipelineNote.textContent = p?.description ?? '';
}

// Registered once: loadModels() runs again whenever a key is saved, and only replaces the list.
els.pipeline.addEventListener('change', describePipeline);

// ---------------------------------------------------------------- photos

function setFiles(fileList) {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
  state.files = Array.from(fileList);
  els.fileList.replaceChildren();
  for (const file of state.files) {
    const li = document.createElement('li');
    const url = URL.createObjectURL(file);
    state.objectUrls.push(url);
    const img = document.createElement('img');
    img.alt = '';
    img.src = url;
    img.addEventListener('error', () => img.remove());
    const name = document.createElement('span');
    name.textContent = `${file.name} (${formatBytes(file.size)})`;
    li.append(img, name);
    els.fileList.append(li);
  }
  if (state.files.length) setStatus('idle', `${state.files.length} photo${state.files.length > 1 ? 's' : ''} ready. Press "Make 3D heads".`);
}

els.files.addEventListener('change', () => setFiles(els.files.files));
for (const type of ['dragenter', 'dragover']) {
  els.dropZone.addEventListener(type, (event) => {
    event.preventDefault();
    els.dropZone.classList.add('dragging');
  });
}
for (const type of ['dragleave', 'drop']) {
  els.dropZone.addEventListener(type, () => els.dropZone.classList.remove('dragging'));
}
els.dropZone.addEventListener('drop', (event) => {
  event.preventDefault();
  if (event.dataTransfer?.files?.length) {
    els.files.files = event.dataTransfer.files;
    setFiles(event.dataTransfer.files);
  }
});

// ---------------------------------------------------------------- status and errors

function setStatus(stateName, text) {
  els.status.dataset.state = stateName;
  els.status.textContent = text;
}

function clearError() {
  els.error.hidden = true;
  els.error.replaceChildren();
  delete els.error.dataset.code;
}

/** @param {ApiError | Error | {code?: string, message?: string}} err */
function showError(err) {
  const code = err.code ?? 'error';
  const message = err.message || 'Something went wrong.';
  let help = ERROR_HELP[code] ?? (err.status >= 500 ? 'The server failed to process the request.' : '');
  if (err.status === 429 || code === 'rate_limited') {
    const wait = err.retryAfter ?? err.details?.retry_after;
    help = `${ERROR_HELP.rate_limited} ${wait != null ? `Try again in ${Math.ceil(wait)} s.` : 'Wait a moment and try again.'}`;
  }
  const parts = [];
  if (help) {
    const p = document.createElement('p');
    const strong = document.createElement('strong');
    strong.textContent = help;
    p.append(strong);
    parts.push(p);
  }
  const detail = document.createElement('p');
  detail.className = 'api-message';
  detail.textContent = message;
  parts.push(detail);
  const codeLine = document.createElement('p');
  codeLine.append('Error code: ');
  const c = document.createElement('code');
  c.textContent = code;
  codeLine.append(c);
  parts.push(codeLine);
  els.error.replaceChildren(...parts);
  els.error.dataset.code = code;
  els.error.hidden = false;
}

/** The stages the API reported, in order, without the `overall` fraction. */
function stagesOf(job) {
  const progress = job.progress && typeof job.progress === 'object' ? job.progress : {};
  return Object.entries(progress).filter(([name]) => name !== 'overall');
}

function currentStage(job) {
  if (job.status !== 'running') return null;
  const stages = stagesOf(job);
  const open = stages.filter(([, f]) => Number(f) < 1);
  return open.length ? open[open.length - 1][0] : null;
}

function renderProgress(job) {
  const stages = stagesOf(job);
  const done = job.status === 'succeeded';
  let overall = Number(job.progress?.overall);
  if (!Number.isFinite(overall)) overall = stages.length ? stages.reduce((n, [, f]) => n + Number(f || 0), 0) / stages.length : 0;
  if (done) overall = 1;
  overall = Math.max(0, Math.min(1, overall));
  els.overallWrap.hidden = job.status === 'queued' && !stages.length;
  els.overall.value = overall;
  els.overallPct.textContent = `${Math.round(overall * 100)}%`;

  const current = currentStage(job);
  const existing = new Map(Array.from(els.stages.children).map((li) => [li.dataset.stage, li]));
  for (const [stage, fraction] of stages) {
    let li = existing.get(stage);
    if (!li) {
      li = document.createElement('li');
      li.dataset.stage = stage;
      const name = document.createElement('span');
      name.textContent = stage.replace(/_/g, ' ');
      const note = document.createElement('span');
      note.className = 'visually-hidden';
      li.append(name, note);
      els.stages.append(li);
    }
    const stateName = done || Number(fraction) >= 1 ? 'done' : stage === current ? 'running' : 'waiting';
    li.dataset.state = stateName;
    li.lastChild.textContent = `: ${stateName}`;
  }
}

function describeJob(job) {
  switch (job.status) {
    case 'queued':
      return job.queue_position != null ? `Queued, position ${job.queue_position} in line…` : 'Queued…';
    case 'running': {
      const stage = currentStage(job);
      return stage ? `Running: ${stage.replace(/_/g, ' ')}…` : 'Running…';
    }
    case 'succeeded': {
      const heads = state.images.reduce((n, im) => n + im.heads.length, 0);
      const ms = job.timings_ms?.pipeline ?? job.timings_ms?.total;
      const took = typeof ms === 'number' ? ` in ${(ms / 1000).toFixed(1)} s` : '';
      if (!heads) return `Done${took}, but no face was found.`;
      return `Done: ${heads} head${heads === 1 ? '' : 's'}${took}.`;
    }
    case 'failed':
      return 'The job failed.';
    case 'canceled':
      return 'The job was canceled.';
    default:
      return String(job.status);
  }
}

// ---------------------------------------------------------------- submitting and polling

els.form.addEventListener('submit', async (event) => {
  event.preventDefault();
  clearError();
  if (!state.files.length) {
    showError({ code: 'no_file', message: 'Choose at least one photo first.' });
    els.files.focus();
    return;
  }
  stopPolling();
  els.stages.replaceChildren();
  els.overallWrap.hidden = true;
  els.results.hidden = true;
  viewer.clear();
  els.submit.disabled = true;
  setStatus('submitting', 'Uploading…');
  const options = {
    pipeline: els.pipeline.value,
    texture_size: els.textureSize.value,
    splats: els.splats.value === '' ? '0' : els.splats.value,
  };
  if (els.maxHeads.value.trim() !== '') options.max_heads = els.maxHeads.value.trim();
  const files = state.files;
  try {
    const job = await submitJob(files, options);
    state.job = { ...job, files, objectUrls: [...state.objectUrls] };
    els.status.dataset.jobId = job.id;
    els.cancel.hidden = false;
    setStatus(job.status ?? 'queued', 'Queued…');
    poll();
  } catch (err) {
    setStatus('failed', 'The upload was refused.');
    showError(err);
    els.submit.disabled = false;
  }
});

els.cancel.addEventListener('click', async () => {
  if (!state.job) return;
  try {
    await cancelJob(state.job.id);
  } catch (err) {
    showError(err);
  }
});

function stopPolling() {
  if (state.pollTimer) clearTimeout(state.pollTimer);
  state.pollTimer = null;
}

async function poll(delay = 400) {
  const current = state.job;
  if (!current) return;
  let job;
  try {
    job = await getJob(current);
  } catch (err) {
    if (state.job !== current) return;
    if (err instanceof ApiError && (err.status === 429 || err.status >= 500 || err.code === 'network_error')) {
      // Transient: keep polling, more slowly.
      const wait = Math.max(delay * 2, (err.retryAfter ?? 0) * 1000);
      state.pollTimer = setTimeout(() => poll(Math.min(wait, 10000)), Math.min(wait, 10000));
      return;
    }
    finish();
    setStatus('failed', 'Could not follow the job.');
    showError(err);
    return;
  }
  if (state.job !== current) return;
  renderProgress(job);
  if (!TERMINAL.has(job.status)) {
    setStatus(job.status, describeJob(job));
    state.pollTimer = setTimeout(() => poll(Math.min(delay * 1.25, 1500)), delay);
    return;
  }
  finish();
  if (job.status === 'succeeded') {
    await showResults(job, current);
    setStatus('succeeded', describeJob(job));
    const empty = state.images.filter((im) => !im.heads.length);
    if (empty.length) {
      const note = empty.flatMap((im) => im.notes).find((n) => typeof n === 'string') ?? 'no face found in the image';
      const which = state.images.length > 1 ? ` (photo ${empty.map((im) => im.photoIndex + 1).join(', ')})` : '';
      showError({ code: 'no_face', message: `${note}${which}` });
    }
  } else {
    setStatus(job.status, describeJob(job));
    if (job.error) showError(job.error);
  }
}

function finish() {
  stopPolling();
  els.submit.disabled = false;
  els.cancel.hidden = true;
}

// ---------------------------------------------------------------- results

/** Split a result document into per-photo entries of `{image, heads, photoIndex}`. */
function imagesOf(result) {
  if (!result || typeof result !== 'object') return [];
  if (Array.isArray(result.heads)) {
    return [{ image: result.image ?? {}, heads: result.heads, notes: result.notes ?? [], photoIndex: 0, prefix: '' }];
  }
  // A job with several photos: `{"images": [document, ...]}`, and photo i's files are named "i/…".
  const list = Array.isArray(result.images) ? result.images : [];
  return list.map((entry, i) => ({
    image: entry.image ?? {},
    heads: Array.isArray(entry.heads) ? entry.heads : [],
    notes: Array.isArray(entry.notes) ? entry.notes : [],
    photoIndex: i,
    prefix: `${i}/`,
  }));
}

/** The GLB and splat PLY of a head: its `artifacts` map (kind → file name) under the photo's prefix. */
function headFiles(head, artifacts, prefix, index) {
  const names = new Set(artifacts.map((a) => a.name));
  const own = Object.values(head.artifacts ?? {})
    .filter((n) => typeof n === 'string')
    .map((n) => prefix + n)
    .filter((n) => names.has(n));
  const fallback = (name) => (names.has(prefix + name) ? prefix + name : null);
  return {
    mesh: own.find((n) => n.endsWith('.glb')) ?? fallback(`h${index}.glb`),
    splats: own.find((n) => n.endsWith('_splats.ply')) ?? fallback(`h${index}_splats.ply`),
    binding: own.find((n) => n.endsWith('_splats_binding.npz')) ?? fallback(`h${index}_splats_binding.npz`),
  };
}

async function showResults(job, submitted) {
  const artifacts = Array.isArray(job.artifacts) ? job.artifacts : [];
  let result = job.result;
  if (!result) {
    const doc = artifacts.find((a) => a.name === 'result.json');
    if (doc) {
      try {
        result = JSON.parse(await (await getBlob(doc.url)).text());
      } catch {
        result = null;
      }
    }
  }
  state.result = result;
  state.artifacts = artifacts;
  state.images = imagesOf(result);
  state.photoUrls = submitted.objectUrls;
  renderDownloads(artifacts);
  els.results.hidden = false;
  renderImageTabs();
  selectImage(0);
}

function renderImageTabs() {
  els.imageTabs.replaceChildren();
  if (state.images.length < 2) return;
  state.images.forEach((entry, i) => {
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = `Photo ${i + 1}`;
    button.setAttribute('aria-pressed', 'false');
    button.addEventListener('click', () => selectImage(i));
    els.imageTabs.append(button);
  });
}

function selectImage(index) {
  state.imageIndex = index;
  Array.from(els.imageTabs.children).forEach((b, i) => b.setAttribute('aria-pressed', String(i === index)));
  const entry = state.images[index];
  const url = state.photoUrls?.[entry?.photoIndex ?? index] ?? state.photoUrls?.[0];
  els.photo.src = url ?? '';
  const drawWhenReady = () => drawOverlay();
  if (els.photo.complete && els.photo.naturalWidth) drawWhenReady();
  else els.photo.addEventListener('load', drawWhenReady, { once: true });

  els.headPicker.replaceChildren();
  const heads = entry?.heads ?? [];
  els.photoSummary.textContent = heads.length
    ? `${heads.length} head${heads.length === 1 ? '' : 's'} found`
    : 'No heads in this photo';
  heads.forEach((head, i) => {
    const button = document.createElement('button');
    button.type = 'button';
    button.textContent = `Head ${i + 1}`;
    button.setAttribute('aria-pressed', 'false');
    button.addEventListener('click', () => selectHead(i));
    els.headPicker.append(button);
  });
  if (heads.length) selectHead(0);
  else {
    viewer.clear();
    els.facts.replaceChildren();
    els.viewerStatus.textContent = 'Nothing to show: no heads were found.';
  }
}

function selectHead(index) {
  state.headIndex = index;
  Array.from(els.headPicker.children).forEach((b, i) => b.setAttribute('aria-pressed', String(i === index)));
  const entry = state.images[state.imageIndex];
  const head = entry.heads[index];
  const files = headFiles(head, state.artifacts, entry.prefix ?? '', head.index ?? index);
  const urlOf = (name) => state.artifacts.find((a) => a.name === name)?.url ?? null;
  renderFacts(head);
  drawOverlay();
  viewer.show(
    {
      mesh: files.mesh && urlOf(files.mesh),
      splats: files.splats && urlOf(files.splats),
      binding: files.binding && urlOf(files.binding),
    },
    getBytes,
  );
}

function renderFacts(head) {
  const rows = [];
  const fmt = (v, digits = 1) => (typeof v === 'number' ? v.toFixed(digits) : '–');
  if (head.score != null) rows.push(['Detection score', fmt(head.score, 3)]);
  if (head.pose) rows.push(['Yaw / pitch / roll', `${fmt(head.pose.yaw)}° / ${fmt(head.pose.pitch)}° / ${fmt(head.pose.roll)}°`]);
  const box = boxOf(head);
  if (box) rows.push(['Box (px)', box.map((v) => Math.round(v)).join(', ')]);
  const lm = head.landmarks_2d;
  if (Array.isArray(lm)) rows.push(['Landmarks', String(lm.length)]);
  els.facts.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    els.facts.append(dt, dd);
  }
}

function boxOf(head) {
  const b = head.box;
  if (Array.isArray(b) && b.length === 4) return b.map(Number);
  if (b && typeof b === 'object' && 'x0' in b) return [b.x0, b.y0, b.x1, b.y1].map(Number);
  return null;
}

/** Draw every head's box and 2D landmarks over the photo; the selected head is highlighted. */
function drawOverlay() {
  const canvas = els.overlay;
  const img = els.photo;
  const entry = state.images[state.imageIndex];
  const width = Number(entry?.image?.width) || img.naturalWidth;
  const height = Number(entry?.image?.height) || img.naturalHeight;
  if (!width || !height) return;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, width, height);
  canvas.dataset.points = '0';
  if (!els.showLandmarks.checked || !entry) return;
  const unit = Math.max(width, height) / 512;
  let points = 0;
  entry.heads.forEach((head, i) => {
    const selected = i === state.headIndex;
    const color = selected ? '#39e27a' : '#f2c94c';
    const box = boxOf(head);
    if (box) {
      ctx.strokeStyle = color;
      ctx.lineWidth = 2 * unit;
      ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    }
    const lm = Array.isArray(head.landmarks_2d) ? head.landmarks_2d : [];
    ctx.fillStyle = color;
    const r = (selected ? 1.4 : 1.0) * unit;
    for (const p of lm) {
      if (!Array.isArray(p) || p.length < 2) continue;
      ctx.beginPath();
      ctx.arc(Number(p[0]), Number(p[1]), r, 0, Math.PI * 2);
      ctx.fill();
      points++;
    }
  });
  canvas.dataset.points = String(points);
}
els.showLandmarks.addEventListener('change', drawOverlay);

function renderDownloads(artifacts) {
  els.downloads.replaceChildren();
  for (const a of artifacts) {
    const li = document.createElement('li');
    const link = document.createElement('a');
    link.href = a.url;
    link.download = a.name.replaceAll('/', '-'); // "0/h0.glb" (photo 0 of several) saves as "0-h0.glb"
    link.textContent = a.name;
    link.dataset.size = String(a.size ?? '');
    if (a.sha256) link.title = `sha256 ${a.sha256}`;
    link.addEventListener('click', (event) => downloadWithKey(event, a));
    const size = document.createElement('span');
    size.className = 'size';
    size.textContent = a.size != null ? formatBytes(a.size) : '';
    li.append(link, size);
    els.downloads.append(li);
  }
}

/** Plain links cannot send an Authorization header: with a key set, fetch the file and save the blob. */
async function downloadWithKey(event, artifact) {
  if (!getApiKey()) return;
  event.preventDefault();
  try {
    const blob = await getBlob(artifact.url);
    const url = URL.createObjectURL(blob);
    const a = document.createElement('a');
    a.href = url;
    a.download = artifact.name.replaceAll('/', '-');
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (err) {
    showError(err);
  }
}

// ---------------------------------------------------------------- viewer controls

for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener('change', () => {
    if (radio.checked) viewer.setMode(radio.value);
  });
}
els.resetView.addEventListener('click', () => viewer.resetView());
els.play.addEventListener('click', () => {
  const playing = viewer.togglePlay();
  els.play.setAttribute('aria-pressed', String(playing));
  els.play.textContent = playing ? 'Pause expressions' : 'Play expressions';
});

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

loadModels();
