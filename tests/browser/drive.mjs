// Drives the web app in headless Chromium (Debian's /usr/bin/chromium through playwright-core) and
// prints what it measured as one JSON document on stdout. The pytest tests in this folder start a
// real `headforge serve`, run this script once per scenario and make the assertions.
//
//   node tests/browser/drive.mjs <scenario> '<json config>'
//
// scenarios:
//   reconstruct  upload a photo on a laptop-sized page, wait for the job, measure the 3D canvas in mesh
//                and splat mode, the landmark overlay and every download link
//   multi        upload several photos as one job (config.photo is a list) and look at each photo's head
//   upload-error upload a photo on a phone-sized page and report the error the page shows (for a file
//                that is not an image, or a photo without a face)
//   options      save the API key twice, report the pipeline list as shown, pick config.options
//                ({textureSize, splats, maxHeads}) in the form, submit, wait for the job and report
//                what the viewer says about the splats
//   animate      (a server with a FLAME asset) submit with the flame pipeline, press "Play expressions",
//                then pause at two times of the built-in sequence in mesh and in splat mode and
//                measure the canvas and what the viewer posed (headforgeViewer.seek)
//
// config: {"url", "photo", "out" (screenshot folder), "name"?, "apiKey"?, "submits"?, "chromium"?,
//          "timeoutMs"?}. With an apiKey the script types it into the page's API key form first.

import { createRequire } from 'node:module';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

const require = createRequire(new URL('../../web/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const [scenario, rawConfig] = process.argv.slice(2);
const config = JSON.parse(rawConfig ?? '{}');
const timeout = config.timeoutMs ?? 240000;
mkdirSync(config.out, { recursive: true });

const browser = await chromium.launch({
  executablePath: config.chromium ?? '/usr/bin/chromium',
  headless: true,
  // No GPU here: WebGL runs on SwiftShader. --no-sandbox because CI runs as root.
  args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
});

const report = { scenario, consoleErrors: [], pageErrors: [] };

function watch(page) {
  page.on('console', (msg) => {
    if (msg.type() === 'error') report.consoleErrors.push(msg.text());
  });
  page.on('pageerror', (err) => report.pageErrors.push(String(err)));
}

/**
 * Read back the viewer's WebGL canvas (it keeps its drawing buffer) and count the pixels that differ
 * from the background, which is sampled from the top-left corner.
 */
async function measureCanvas(page) {
  return page.evaluate(() => {
    const src = document.getElementById('viewer-canvas');
    const c = document.createElement('canvas');
    c.width = src.width;
    c.height = src.height;
    const ctx = c.getContext('2d');
    ctx.drawImage(src, 0, 0);
    const { data } = ctx.getImageData(0, 0, c.width, c.height);
    const bg = [data[0], data[1], data[2]];
    let differing = 0;
    const colors = new Set();
    for (let i = 0; i < data.length; i += 4) {
      const d = Math.abs(data[i] - bg[0]) + Math.abs(data[i + 1] - bg[1]) + Math.abs(data[i + 2] - bg[2]);
      if (d > 30) {
        differing++;
        colors.add(((data[i] >> 3) << 10) | ((data[i + 1] >> 3) << 5) | (data[i + 2] >> 3));
      }
    }
    return { width: c.width, height: c.height, background: bg, differing, distinctColors: colors.size };
  });
}

async function waitForViewer(page, mode) {
  await page.waitForFunction(
    (m) => {
      const c = document.getElementById('viewer-canvas');
      return c && c.dataset.mode === m && ['ready', 'failed', 'missing'].includes(c.dataset.state);
    },
    mode,
    { timeout: 60000 },
  );
  // Two animation frames so the last render has reached the drawing buffer.
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  return page.evaluate(() => ({
    state: document.getElementById('viewer-canvas').dataset.state,
    text: document.getElementById('viewer-status').textContent,
  }));
}

async function unlabeledControls(page) {
  return page.evaluate(() =>
    Array.from(document.querySelectorAll('input, select, textarea, button'))
      .filter((el) => {
        if (el.type === 'hidden' || el.hidden) return false;
        const named = el.labels?.length || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby');
        const text = el.tagName === 'BUTTON' && el.textContent.trim();
        return !named && !text;
      })
      .map((el) => el.id || el.name || el.outerHTML.slice(0, 60)),
  );
}

async function enterApiKey(page) {
  if (!config.apiKey) return;
  await page.locator('#key-details > summary').click();
  await page.getByLabel('API key').fill(config.apiKey);
  await page.getByRole('button', { name: 'Save' }).click();
  report.keyStorage = await page.evaluate(() => ({
    session: sessionStorage.getItem('headforge.apiKey'),
    localKeys: Object.keys(localStorage),
    cookies: document.cookie,
  }));
}

async function horizontalOverflow(page) {
  return page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
}

async function reconstruct() {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 }, acceptDownloads: true });
  const page = await context.newPage();
  watch(page);
  await page.goto(config.url, { waitUntil: 'load' });
  report.unlabeled = await unlabeledControls(page);
  await enterApiKey(page);

  await page.setInputFiles('#images', config.photo);
  await page.getByRole('button', { name: 'Make 3D heads' }).click();
  const stagesSeen = new Set();
  const deadline = Date.now() + timeout;
  let finalState = null;
  while (Date.now() < deadline) {
    const s = await page.evaluate(() => ({
      state: document.getElementById('status').dataset.state,
      text: document.getElementById('status').textContent,
      stages: Array.from(document.querySelectorAll('#stages li')).map((li) => li.dataset.stage),
    }));
    s.stages.forEach((x) => stagesSeen.add(x));
    if (['succeeded', 'failed', 'canceled'].includes(s.state)) {
      finalState = s;
      break;
    }
    await page.waitForTimeout(250);
  }
  report.status = finalState;
  report.jobId = await page.locator('#status').getAttribute('data-job-id');
  report.stages = [...stagesSeen];
  report.errorText = await page.locator('#error').isVisible() ? await page.locator('#error').innerText() : null;
  if (!finalState || finalState.state !== 'succeeded') {
    await page.screenshot({ path: join(config.out, 'web-failed.png'), fullPage: true });
    return;
  }

  report.meshViewer = await waitForViewer(page, 'mesh');
  report.mesh = await measureCanvas(page);
  await page.locator('#viewer-canvas').screenshot({ path: join(config.out, 'viewer-mesh.png') });
  await page.screenshot({ path: join(config.out, 'web-laptop.png'), fullPage: true });

  // Switch to the splats with the keyboard: focus the checked radio, arrow to the next one.
  await page.locator('input[name="mode"][value="mesh"]').focus();
  await page.keyboard.press('ArrowRight');
  report.splatsViewer = await waitForViewer(page, 'splats');
  report.splats = await measureCanvas(page);
  await page.locator('#viewer-canvas').screenshot({ path: join(config.out, 'viewer-splats.png') });

  // Orbit a little with the mouse and make sure the splats still draw from the new angle.
  const box = await page.locator('#viewer-canvas').boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.down();
  await page.mouse.move(box.x + box.width / 2 + 120, box.y + box.height / 2 + 30, { steps: 4 });
  await page.mouse.up();
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  report.splatsOrbited = await measureCanvas(page);
  await page.locator('#viewer-canvas').screenshot({ path: join(config.out, 'viewer-splats-orbited.png') });

  // Back to the mesh for the README screenshot.
  await page.locator('input[name="mode"][value="mesh"]').check();
  await page.locator('#reset-view').click();
  await waitForViewer(page, 'mesh');
  await page.locator('#results').screenshot({ path: join(config.out, 'web-results.png') });

  report.overlay = await page.evaluate(() => {
    const c = document.getElementById('overlay');
    const { data } = c.getContext('2d').getImageData(0, 0, c.width, c.height);
    let painted = 0;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) painted++;
    return { width: c.width, height: c.height, points: Number(c.dataset.points), painted };
  });

  // Every download link, clicked like a person would.
  const links = await page.locator('#downloads a').evaluateAll((as) =>
    as.map((a) => ({ name: a.textContent, href: a.href, download: a.getAttribute('download'), size: Number(a.dataset.size) })),
  );
  report.downloads = [];
  for (const link of links) {
    const [download] = await Promise.all([
      page.waitForEvent('download', { timeout: 30000 }),
      page.locator('#downloads').getByRole('link', { name: link.name, exact: true }).click(),
    ]);
    const failure = await download.failure();
    const path = failure ? null : await download.path();
    const bytes = path ? readFileSync(path) : null;
    const auth = config.apiKey ? { Authorization: `Bearer ${config.apiKey}` } : {};
    const response = await context.request.get(link.href, { headers: auth });
    const withoutKey = config.apiKey ? (await context.request.get(link.href)).status() : null;
    report.downloads.push({
      ...link,
      suggested: download.suggestedFilename(),
      failure,
      downloadedBytes: bytes ? bytes.length : null,
      downloadedSha256: bytes ? createHash('sha256').update(bytes).digest('hex') : null,
      httpStatus: response.status(),
      httpBytes: (await response.body()).length,
      httpStatusWithoutKey: withoutKey,
    });
  }
  report.overflowLaptop = await horizontalOverflow(page);

  // The same results on a phone-sized viewport: one column, no sideways scrolling, and the viewer
  // re-renders at its new size.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForFunction(() => document.getElementById('viewer-canvas').width < 400);
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  report.overflowPhone = await horizontalOverflow(page);
  report.meshPhone = await measureCanvas(page);
  await page.screenshot({ path: join(config.out, 'web-phone-results.png'), fullPage: true });
  await context.close();
}

async function options() {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  // Count the `change` listeners the app adds to the pipeline <select>: the list is reloaded on every
  // key save, and each reload must not add another one.
  await context.addInitScript(() => {
    window.__pipelineChangeListeners = 0;
    const add = EventTarget.prototype.addEventListener;
    EventTarget.prototype.addEventListener = function (type, ...rest) {
      if (type === 'change' && this instanceof HTMLSelectElement && this.id === 'pipeline') {
        window.__pipelineChangeListeners++;
      }
      return add.call(this, type, ...rest);
    };
  });
  const page = await context.newPage();
  watch(page);
  await page.goto(config.url, { waitUntil: 'load' });
  // Each save reloads GET /v1/models (the first load, without a key, is refused by the server).
  await enterApiKey(page);
  await page.locator('#key-details > summary').click();
  await Promise.all([
    page.waitForResponse((r) => new URL(r.url()).pathname === '/v1/models'),
    page.getByRole('button', { name: 'Save' }).click(),
  ]);
  await page.waitForFunction(() => document.querySelectorAll('#pipeline option').length > 1);

  const chosen = config.options ?? {};
  await page.getByLabel('Texture size').selectOption(String(chosen.textureSize));
  await page.getByLabel('Splats per head').fill(String(chosen.splats));
  await page.getByLabel('Most heads per photo').fill(String(chosen.maxHeads));
  report.pipeline = await page.evaluate(() => ({
    value: document.getElementById('pipeline').value,
    note: document.getElementById('pipeline-note').textContent,
    options: Array.from(document.querySelectorAll('#pipeline option')).map((o) => ({
      value: o.value,
      text: o.textContent,
      disabled: o.disabled,
      title: o.title,
    })),
  }));
  report.form = await page.evaluate(() => ({
    textureSize: document.getElementById('texture-size').value,
    splats: document.getElementById('splats').value,
    maxHeads: document.getElementById('max-heads').value,
  }));

  await page.setInputFiles('#images', config.photo);
  await page.getByRole('button', { name: 'Make 3D heads' }).click();
  report.status = await waitForJob(page);
  report.pipelineChangeListeners = await page.evaluate(() => window.__pipelineChangeListeners);
  if (report.status.state !== 'succeeded') return;
  await waitForViewer(page, 'mesh');
  await page.getByLabel('Gaussian splats').check();
  report.splatsViewer = await waitForViewer(page, 'splats');
  await page.screenshot({ path: join(config.out, 'web-options.png'), fullPage: true });
  await context.close();
}

async function waitForJob(page) {
  await page.waitForFunction(
    () => ['succeeded', 'failed', 'canceled'].includes(document.getElementById('status').dataset.state),
    null,
    { timeout },
  );
  return page.evaluate(() => ({
    state: document.getElementById('status').dataset.state,
    text: document.getElementById('status').textContent,
    jobId: document.getElementById('status').dataset.jobId,
  }));
}

async function multi() {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const page = await context.newPage();
  watch(page);
  await page.goto(config.url, { waitUntil: 'load' });
  await enterApiKey(page);
  await page.setInputFiles('#images', config.photo);
  await page.getByRole('button', { name: 'Make 3D heads' }).click();
  report.status = await waitForJob(page);
  if (report.status.state !== 'succeeded') return;
  report.photos = [];
  const tabs = page.locator('#image-tabs button');
  const count = await tabs.count();
  for (let i = 0; i < count; i++) {
    await tabs.nth(i).click();
    const viewer = await waitForViewer(page, 'mesh');
    const photo = await page.evaluate(() => ({
      pressed: Array.from(document.querySelectorAll('#image-tabs button')).map((b) => b.getAttribute('aria-pressed')),
      points: Number(document.getElementById('overlay').dataset.points),
      photoSrc: document.getElementById('photo').src,
    }));
    report.photos.push({ ...photo, viewer, canvas: await measureCanvas(page) });
    await page.locator('#viewer-canvas').screenshot({ path: join(config.out, `viewer-multi-${i}.png`) });
  }
  report.links = await page.locator('#downloads a').evaluateAll((as) =>
    as.map((a) => ({ name: a.textContent, download: a.getAttribute('download') })),
  );
  await context.close();
}

async function uploadError() {
  // A phone-sized page: the layout must fit and the error must be readable.
  const context = await browser.newContext({
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
  });
  const page = await context.newPage();
  watch(page);
  await page.goto(config.url, { waitUntil: 'load' });
  report.unlabeled = await unlabeledControls(page);
  report.overflowPhone = await horizontalOverflow(page);
  await enterApiKey(page);
  await page.setInputFiles('#images', config.photo);
  report.errors = [];
  for (let i = 0; i < (config.submits ?? 1); i++) {
    // Each submission clears the error first, so wait for a fresh one to appear.
    await page.getByRole('button', { name: 'Make 3D heads' }).click();
    await page.locator('#error').waitFor({ state: 'visible', timeout });
    report.errors.push(await page.locator('#error').getAttribute('data-code'));
  }
  report.errorText = await page.locator('#error').innerText();
  report.errorCode = await page.locator('#error').getAttribute('data-code');
  report.errorRole = await page.locator('#error').getAttribute('role');
  report.status = await page.locator('#status').innerText();
  report.statusState = await page.locator('#status').getAttribute('data-state');
  report.jobId = await page.locator('#status').getAttribute('data-job-id');
  await page.screenshot({ path: join(config.out, `web-phone-error-${config.name ?? 'upload'}.png`), fullPage: true });
  await context.close();
}

async function animate() {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  const page = await context.newPage();
  watch(page);
  await page.goto(config.url, { waitUntil: 'load' });
  await enterApiKey(page);
  await page.waitForFunction(() => {
    const flame = document.querySelector('#pipeline option[value="flame"]');
    return flame && !flame.disabled;
  });
  await page.getByLabel('Pipeline', { exact: true }).selectOption('flame');
  await page.getByLabel('Texture size').selectOption('512');
  await page.setInputFiles('#images', config.photo);
  await page.getByRole('button', { name: 'Make 3D heads' }).click();
  report.status = await waitForJob(page);
  if (report.status.state !== 'succeeded') return;
  report.meshViewer = await waitForViewer(page, 'mesh');
  await page.waitForFunction(() => document.getElementById('viewer-canvas').dataset.animation === 'paused');
  report.animatedSplats = await page.locator('#viewer-canvas').getAttribute('data-animated-splats');
  const play = page.getByRole('button', { name: 'Play expressions' });
  report.playVisible = await play.isVisible();
  await play.click();
  const times = [];
  for (let i = 0; i < 3; i++) {
    await page.waitForTimeout(700);
    times.push(Number(await page.locator('#viewer-canvas').getAttribute('data-animation-time')));
  }
  report.playing = {
    state: await page.locator('#viewer-canvas').getAttribute('data-animation'),
    pressed: await page.locator('#play').getAttribute('aria-pressed'),
    times,
  };
  await page.getByRole('button', { name: 'Pause expressions' }).click();
  report.frames = {};
  for (const mode of ['mesh', 'splats']) {
    await page.locator(`input[name="mode"][value="${mode}"]`).check();
    await waitForViewer(page, mode);
    for (const t of config.times ?? [0, 1.6]) {
      const sample = await page.evaluate((time) => window.headforgeViewer.seek(time), t);
      await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
      const canvas = await measureCanvas(page);
      const key = `${mode}@${t}`;
      await page.locator('#viewer-canvas').screenshot({ path: join(config.out, `viewer-animate-${mode}-${t}.png`) });
      const pixels = await page.evaluate(() => {
        const src = document.getElementById('viewer-canvas');
        const c = document.createElement('canvas');
        c.width = src.width;
        c.height = src.height;
        const ctx = c.getContext('2d');
        ctx.drawImage(src, 0, 0);
        const { data } = ctx.getImageData(0, 0, c.width, c.height);
        let sum = 0;
        for (let i = 0; i < data.length; i += 4) sum = (sum * 31 + data[i] + 7 * data[i + 1] + 13 * data[i + 2]) % 1000000007;
        return sum;
      });
      report.frames[key] = { sample, canvas, pixelHash: pixels };
    }
  }
  report.jobId = report.status.jobId;
  await context.close();
}

try {
  if (scenario === 'reconstruct') await reconstruct();
  else if (scenario === 'animate') await animate();
  else if (scenario === 'upload-error') await uploadError();
  else if (scenario === 'multi') await multi();
  else if (scenario === 'options') await options();
  else throw new Error(`unknown scenario ${scenario}`);
} catch (err) {
  report.exception = String(err?.stack ?? err);
} finally {
  await browser.close();
}
process.stdout.write(`${JSON.stringify(report)}\n`);
