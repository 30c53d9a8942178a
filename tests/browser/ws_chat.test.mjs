// Headless Chromium against c-examples/ws_chat (run by `make ws-chat-test`).
//
// Opens two chat pages in room A, one in room B and an EventSource page on room A, types a
// message in A1 and checks, with sentinels so that absence is proven rather than waited for:
//   - it appears in A2 (as a message from someone else) and in the EventSource page;
//   - A1 shows it once, as its own (the page echoes locally: class "me"); the server does
//     not echo it back (no "them" entry with it, even after a later message from A2 arrived);
//   - B never receives it (B's log is checked after a later message in room B arrived);
//   - room B's messages never reach room A's pages or the EventSource page.
// Saves screenshots to target/artifacts/ws_chat.png (A1) and ws_chat_sse.png.
//
// Usage: node --test ws_chat.test.mjs, with WS_CHAT_BIN=path/to/ws_chat (default
// target/c/ws_chat). Chromium is Debian's, at /usr/bin/chromium (CHROMIUM to override).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.resolve(ROOT, process.env.WS_CHAT_BIN ?? 'target/c/ws_chat');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = path.join(ROOT, 'target/artifacts');
const WAIT = 10_000; // ms, for any single wait

/** Starts ws_chat on a free port; resolves with the process, its port and its stderr. */
async function startServer() {
  const server = spawn(BIN, ['0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const stderr = [];
  server.stderr.on('data', (chunk) => stderr.push(chunk));
  const port = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`no port from ${BIN} within ${WAIT} ms`)), WAIT);
    server.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    server.on('exit', (code) => reject(new Error(`${BIN} exited with ${code}: ${Buffer.concat(stderr)}`)));
  });
  return { server, port, stderr: () => Buffer.concat(stderr).toString() };
}

/** The entries of a chat page's log, as [class, text] pairs. */
const entries = (page) =>
  page.$$eval('#log li', (lis) => lis.map((li) => [li.className, li.textContent]));

/** Waits until the page's log has an entry with this class and text. */
async function waitEntry(page, cls, text) {
  await page.waitForFunction(
    ([c, t]) => [...document.querySelectorAll('#log li')].some((li) => li.className === c && li.textContent === t),
    [cls, text],
    { timeout: WAIT },
  );
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
  await waitEntry(page, 'me', text); // the page shows its own message at once
}

test('ws_chat in headless Chromium: rooms, no echo, EventSource', { timeout: 90_000 }, async () => {
  const { server, port, stderr } = await startServer();
  const profile = mkdtempSync(path.join(tmpdir(), 'fdcast-chromium-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ],
      viewport: { width: 800, height: 600 },
      timeout: 30_000,
    });
    context.setDefaultTimeout(WAIT);
    const base = `http://127.0.0.1:${port}`;
    const open = async (url) => {
      const page = await context.newPage();
      const errors = [];
      page.on('pageerror', (err) => errors.push(err));
      await page.goto(base + url);
      await page.waitForSelector('body[data-state="open"]', { timeout: WAIT });
      page.errors = errors;
      return page;
    };
    const a1 = await open('/?room=A');
    const a2 = await open('/?room=A');
    const b1 = await open('/?room=B');
    const sse = await open('/sse.html?room=A');
    assert.equal(await a1.textContent('#room'), 'A');
    assert.equal(await sse.textContent('#room'), 'A');

    const m1 = 'hello from A1 — ünïcödé ✓';
    await say(a1, m1);
    await waitEntry(a2, 'them', m1);
    await sse.waitForFunction((t) => [...document.querySelectorAll('#log li')].some((li) => li.textContent === t), m1);

    // Room B talks: its page shows its own message, then a sentinel from a second socket in
    // room B (opened inside B's page) arrives. Had A1's message gone to B1, it would have
    // come first on B1's connection, since the server published it earlier.
    await say(b1, 'B only');
    await b1.evaluate(
      (url) =>
        new Promise((resolve, reject) => {
          const ws = new WebSocket(url);
          ws.onopen = () => {
            ws.send('B sentinel');
            ws.close();
            resolve();
          };
          ws.onerror = () => reject(new Error('sentinel socket failed'));
        }),
      `ws://127.0.0.1:${port}/ws?room=B`,
    );
    await waitEntry(b1, 'them', 'B sentinel');
    assert.deepEqual(await entries(b1), [['me', 'B only'], ['them', 'B sentinel']]);

    // A2 answers: once the answer reached A1 and the EventSource page, anything the server
    // sent them before it (an echo of A1's message, room B's messages) would be there too.
    await say(a2, 'reply from A2');
    await waitEntry(a1, 'them', 'reply from A2');
    await sse.waitForFunction(() => document.querySelectorAll('#log li').length >= 2);
    assert.deepEqual(await entries(a1), [['me', m1], ['them', 'reply from A2']]);
    assert.deepEqual(await entries(a2), [['them', m1], ['me', 'reply from A2']]);
    assert.deepEqual(await entries(sse), [['', m1], ['', 'reply from A2']]);
    for (const page of [a1, a2, b1, sse]) assert.deepEqual(page.errors, []);
    assert.equal(await a1.textContent('#state'), 'connected');

    mkdirSync(ARTIFACTS, { recursive: true });
    await a1.screenshot({ path: path.join(ARTIFACTS, 'ws_chat.png') });
    await sse.screenshot({ path: path.join(ARTIFACTS, 'ws_chat_sse.png') });
  } finally {
    if (context) await context.close();
    rmSync(profile, { recursive: true, force: true });
    if (server.exitCode === null) {
      server.kill('SIGTERM');
      const timer = setTimeout(() => server.kill('SIGKILL'), WAIT);
      await once(server, 'exit');
      clearTimeout(timer);
    }
  }
  assert.equal(server.exitCode, 0, `ws_chat exit status after SIGTERM; stderr:\n${stderr()}`);
  assert.doesNotMatch(stderr(), /Sanitizer|runtime error/, 'sanitizer report from ws_chat');
});
