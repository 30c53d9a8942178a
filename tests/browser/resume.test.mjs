// Headless Chromium against c-examples/ws_chat: clients that lose their connection resume
// from the last id they saw, and show every message exactly once, in order (run by
// `make ws-chat-test`).
//
// A publisher (a WebSocket inside Chromium) sends m1, m2, ... to a room, one every 10 ms,
// while a reading page shows the room. DROPS times, once the page has received messages on
// its current connection, the test makes the server close that connection
// (POST /admin/drop?room=...); the page reconnects by itself. Then the publisher stops after
// N messages, and the page must show exactly m1..mN, in order, with ids whose offsets run
// 1..N in one epoch. The reading pages:
//   (a) sse.html: an EventSource, which reconnects on its own and sends Last-Event-ID; the
//       server's log must show one "resume SSE" per drop, none with messages lost;
//   (b) resume.html: a WebSocket in FDCAST_WS_TEXT_ID ("<id>\n<text>" per message) that
//       reconnects with ?last_id=<the last id it saw>; the same checks with "resume WebSocket".
//
// Usage: node --test resume.test.mjs, with WS_CHAT_BIN=path/to/ws_chat (default
// target/c/ws_chat). Chromium is Debian's, at /usr/bin/chromium (CHROMIUM to override).

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.resolve(ROOT, process.env.WS_CHAT_BIN ?? 'target/c/ws_chat');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
const WAIT = 10_000; // ms, for any single wait
const DROPS = 4;

/** Starts ws_chat on a free port; keeps all of its stdout (the resume log) and stderr. */
async function startServer() {
  const server = spawn(BIN, ['0'], { stdio: ['ignore', 'pipe', 'pipe'] });
  const stdout = [];
  const stderr = [];
  server.stderr.on('data', (chunk) => stderr.push(chunk));
  const port = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no port from ${BIN} within ${WAIT} ms`)), WAIT);
    server.stdout.on('data', (chunk) => {
      stdout.push(chunk);
      const m = Buffer.concat(stdout).toString().match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    server.on('exit', (code) => reject(new Error(`${BIN} exited with ${code}: ${Buffer.concat(stderr)}`)));
  });
  return {
    server,
    port,
    stdout: () => Buffer.concat(stdout).toString(),
    stderr: () => Buffer.concat(stderr).toString(),
  };
}

/** The page's messages, as [text, id] pairs. */
const messages = (page) =>
  page.$$eval('#log li', (lis) => lis.map((li) => [li.textContent, li.dataset.id]));

const count = (page) => page.evaluate(() => document.querySelectorAll('#log li').length);

/** Waits until the page is connected for the `opens`-th time and has `atLeast` messages. */
async function waitConnected(page, opens, atLeast) {
  await page.waitForFunction(
    ([o, n]) =>
      document.body.dataset.state === 'open' &&
      Number(document.body.dataset.opens) === o &&
      document.querySelectorAll('#log li').length >= n,
    [opens, atLeast],
    { timeout: WAIT },
  );
}

/** Starts sending m1, m2, ... to `room` from inside `page`, one every 10 ms, until stopped. */
async function startPublisher(page, port, room) {
  await page.evaluate(
    (url) =>
      new Promise((started, failed) => {
        window.sent = 0;
        window.stopped = false;
        const ws = new WebSocket(url);
        ws.onerror = () => failed(new Error('publisher socket failed'));
        window.done = new Promise((resolve) => {
          ws.onopen = () => {
            started();
            const tick = () => {
              if (window.stopped) {
                ws.close();
                resolve(window.sent);
                return;
              }
              ws.send('m' + ++window.sent);
              setTimeout(tick, 10);
            };
            tick();
          };
        });
      }),
    `ws://127.0.0.1:${port}/ws?room=${room}`,
  );
}

/** Stops the publisher; resolves with how many messages it sent. */
const stopPublisher = (page) =>
  page.evaluate(() => {
    window.stopped = true;
    return window.done;
  });

test('ws_chat in headless Chromium: EventSource and WebSocket pages resume by id', { timeout: 60_000 }, async (t) => {
  const { server, port, stdout, stderr } = await startServer();
  const base = `http://127.0.0.1:${port}`;
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
    const publisher = await context.newPage();
    await publisher.goto(`${base}/?room=publisher`);
    await publisher.waitForSelector('body[data-state="open"]');

    const resumes = (kind, room) =>
      stdout()
        .split('\n')
        .filter((line) => line.startsWith(`ws_chat: resume ${kind} room:${room} after `));

    async function dropsAndResumes(pageUrl, room, kind) {
      const page = await context.newPage();
      const errors = [];
      page.on('pageerror', (err) => errors.push(err));
      await page.goto(base + pageUrl);
      await waitConnected(page, 1, 0);
      await startPublisher(publisher, port, room);
      let seen = 0;
      for (let drop = 1; drop <= DROPS; drop++) {
        // Messages flow on this connection: the page has an id to come back with.
        await waitConnected(page, drop, seen + 3);
        const response = await fetch(`${base}/admin/drop?room=${room}`, { method: 'POST' });
        assert.equal(response.status, 200);
        assert.equal(await response.text(), '1\n', `drop ${drop}: one connection closed`);
        seen = await count(page);
      }
      await waitConnected(page, DROPS + 1, seen + 3);
      const sent = await stopPublisher(publisher);
      assert.ok(sent > seen, `the publisher sent ${sent}`);
      await page.waitForFunction((n) => document.querySelectorAll('#log li').length >= n, sent);
      // A duplicate would come with or before the last message: let any stragglers arrive.
      await page.waitForTimeout(200);

      const got = await messages(page);
      const expected = Array.from({ length: sent }, (_, i) => `m${i + 1}`);
      assert.deepEqual(got.map(([text]) => text), expected, 'every message once, in order');
      const ids = got.map(([, id]) => id.match(/^(\d+)-(\d+)$/));
      assert.ok(ids.every(Boolean), `every message has an id: ${got.slice(0, 3)}`);
      assert.ok(ids.every((m) => m[1] === ids[0][1]), 'one epoch');
      assert.deepEqual(ids.map((m) => Number(m[2])), expected.map((_, i) => i + 1), 'offsets 1..N');
      assert.equal(Number(await page.evaluate(() => document.body.dataset.opens)), DROPS + 1);

      // The server saw each reconnect resume from an id, and lost nothing.
      const log = resumes(kind, room);
      assert.equal(log.length, DROPS, `resumes logged:\n${stdout()}`);
      assert.ok(log.every((line) => !line.includes('lost')), log.join('\n'));
      assert.deepEqual(errors, []);
      await page.close();
    }

    await t.test('(a) EventSource reconnects with Last-Event-ID', () =>
      dropsAndResumes('/sse.html?room=flow-sse', 'flow-sse', 'SSE'));
    await t.test('(b) WebSocket page reconnects with ?last_id=', () =>
      dropsAndResumes('/resume.html?room=flow-ws', 'flow-ws', 'WebSocket'));
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
