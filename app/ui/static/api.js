// The dashboard's only way into the gateway: the public JSON API, with the bearer token from
// POST /auth/token. Nothing here knows about the page; app.js renders what these calls return.
//
// The token lives in sessionStorage: it survives a reload of the tab but not closing it, and
// other tabs and sites cannot read it. It is never put in a cookie (so no CSRF surface) nor in
// a URL (so it never reaches logs or Referer headers).

const TOKEN_KEY = "model-gateway.dashboard.token";
const USER_KEY = "model-gateway.dashboard.user";

/** An answer that was not 2xx, with the gateway's own message from its error envelope. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  get user() {
    try {
      return JSON.parse(sessionStorage.getItem(USER_KEY) || "null");
    } catch {
      return null;
    }
  },
  save(token, user) {
    sessionStorage.setItem(TOKEN_KEY, token);
    sessionStorage.setItem(USER_KEY, JSON.stringify(user));
  },
  clear() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(USER_KEY);
  },
};

/**
 * The message of an error body: `{"detail": "...", "code": ...}`, a 422's list of
 * `{loc, msg}`, or OpenAI's `{"error": {"message"}}` (under /v1); otherwise the HTTP status.
 */
export function errorMessage(body, response) {
  const detail = body && typeof body === "object" ? body.detail : undefined;
  let message;
  if (typeof detail === "string" && detail) {
    message = detail;
  } else if (Array.isArray(detail)) {
    message = detail
      .map((d) => {
        const where = Array.isArray(d?.loc) ? d.loc.join(".") : "";
        return where ? `${where}: ${d?.msg ?? ""}` : String(d?.msg ?? JSON.stringify(d));
      })
      .join("; ");
  } else if (body && typeof body.error === "object" && body.error && body.error.message) {
    message = String(body.error.message);
  } else {
    message = `HTTP ${response.status} ${response.statusText}`.trim();
  }
  const retryAfter = response.headers.get("Retry-After");
  if (response.status === 429 && retryAfter) {
    message += ` (retry after ${retryAfter} s)`;
  }
  return message;
}

/**
 * One API call. Resolves to the parsed JSON body; rejects with ApiError (status 0 when the
 * gateway could not be reached at all).
 */
export async function api(path, { method = "GET", form = null, json = null, auth = true } = {}) {
  const headers = { Accept: "application/json" };
  if (json !== null) headers["Content-Type"] = "application/json";
  const token = session.token;
  if (auth && token) {
    headers.Authorization = `Bearer ${token}`;
  }
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      // URLSearchParams: sent as application/x-www-form-urlencoded, the form POST /auth/token reads.
      body: form ? new URLSearchParams(form) : json !== null ? JSON.stringify(json) : undefined,
      credentials: "omit",
      cache: "no-store",
    });
  } catch (err) {
    throw new ApiError(0, "network_error", `gateway unreachable (${err?.message ?? err})`);
  }
  const text = await response.text();
  let body = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!response.ok) {
    const code = body && typeof body.code === "string" ? body.code : `http_${response.status}`;
    throw new ApiError(response.status, code, errorMessage(body, response));
  }
  return body;
}

/** POST /auth/token; the answer carries access_token, expires_in and role. */
export function login(username, password) {
  return api("/auth/token", { method: "POST", form: { username, password }, auth: false });
}
