// A thin client for headforge's REST API, as the browser app uses it.

const KEY_STORAGE = 'headforge.apiKey';

export class ApiError extends Error {
  /**
   * @param {string} message the API's own message
   * @param {{code?: string, status?: number, details?: object, retryAfter?: number | null}} info
   */
  constructor(message, info = {}) {
    super(message);
    this.code = info.code ?? 'error';
    this.status = info.status ?? 0;
    this.details = info.details ?? {};
    this.retryAfter = info.retryAfter ?? null;
  }
}

export function getApiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) ?? '';
  } catch {
    return '';
  }
}

export function setApiKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage can be disabled (private modes); the key then lasts until reload via memory only.
  }
}

function authHeaders() {
  const key = getApiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** Turn a non-2xx response into an ApiError carrying the API's code and message. */
async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  // The API answers `{"error": {code, message, details}}`; accept a bare `{code, message}` or a
  // FastAPI-style `{"detail": ...}` too.
  let err = body && typeof body === 'object' ? (body.error ?? body) : {};
  if (err && typeof err.detail === 'object' && !Array.isArray(err.detail) && err.detail !== null) err = err.detail;
  let message = typeof err?.message === 'string' ? err.message : '';
  if (!message && typeof err?.detail === 'string') message = err.detail;
  if (!message) message = `${response.status} ${response.statusText || 'error'}`.trim();
  const header = response.headers.get('Retry-After');
  let retryAfter = header !== null && header !== '' && !Number.isNaN(Number(header)) ? Number(header) : null;
  if (retryAfter === null && err?.details && typeof err.details.retry_after === 'number') retryAfter = err.details.retry_after;
  return new ApiError(message, {
    code: typeof err?.code === 'string' ? err.code : `http_${response.status}`,
    status: response.status,
    details: err?.details ?? {},
    retryAfter,
  });
}

async function request(url, options = {}) {
  let response;
  try {
    response = await fetch(url, { ...options, headers: { ...authHeaders(), ...(options.headers ?? {}) } });
  } catch (cause) {
    throw new ApiError(`Could not reach the server (${cause.message || cause}).`, { code: 'network_error' });
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

export async function getJson(url) {
  return (await request(url)).json();
}

export async function getBytes(url) {
  return (await request(url)).arrayBuffer();
}

export async function getBlob(url) {
  return (await request(url)).blob();
}

export async function listModels() {
  return getJson('v1/models');
}

/**
 * @param {File[]} files
 * @param {Record<string, string>} options form fields
 */
export async function submitJob(files, options) {
  const form = new FormData();
  for (const file of files) form.append('images', file, file.name);
  for (const [name, value] of Object.entries(options)) form.append(name, value);
  const response = await request('v1/jobs', { method: 'POST', body: form });
  return response.json();
}

export async function getJob(job) {
  return getJson(job.status_url ?? `v1/jobs/${encodeURIComponent(job.id)}`);
}

export async function cancelJob(id) {
  await request(`v1/jobs/${encodeURIComponent(id)}`, { method: 'DELETE' });
}
