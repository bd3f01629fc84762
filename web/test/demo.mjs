#!/usr/bin/env node
// End-to-end test of the demo page in headless Chromium, against a running
// wsproto server with the publish API enabled.
//
//   node web/test/demo.mjs <base-url> <api-key>
//   node web/test/demo.mjs http://127.0.0.1:8080 secret
//
// (or DEMO_BASE_URL / DEMO_API_KEY in the environment). Needs `npm install`
// in web/ (playwright-core) and a Chromium: CHROMIUM_PATH, default
// /usr/bin/chromium. SCREENSHOT_DIR, when set, receives a screenshot of
// each page at the end (and on failure). Exits 0 on success, 1 on failure,
// 2 on bad usage.
//
// `node --test web/test/` also loads this file; without a base URL it then
// only reports a skipped test.

const OVERALL_TIMEOUT_MS = 60_000;
const STEP_TIMEOUT_MS = 15_000;

const [baseArg, keyArg] = process.argv.slice(2);
const base = (baseArg ?? process.env.DEMO_BASE_URL ?? '').replace(/\/+$/, '');
const apiKey = keyArg ?? process.env.DEMO_API_KEY ?? '';

if (!base && process.env.NODE_TEST_CONTEXT) {
  const { test } = await import('node:test');
  test('demo page end to end (needs a server: node web/test/demo.mjs <base-url> <api-key>)', { skip: true });
} else if (!base || !apiKey) {
  console.error('usage: node web/test/demo.mjs <base-url> <api-key>');
  process.exit(2);
} else {
  process.exit(await run());
}

async function run() {
  let browser;
  const pages = {}; // name -> {page, errors, console}
  let failed = null;
  const timeout = new Promise((_, reject) => {
    const t = setTimeout(
      () => reject(new Error(`timed out after ${OVERALL_TIMEOUT_MS / 1000} s`)),
      OVERALL_TIMEOUT_MS,
    );
    t.unref();
  });

  try {
    await Promise.race([
      timeout,
      (async () => {
        const { chromium } = await import('playwright-core');
        browser = await chromium.launch({
          executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
          headless: true,
          args: [
            '--no-sandbox',
            '--disable-gpu',
            '--disable-quic',
            '--no-first-run',
            '--disable-background-networking',
            '--disable-component-update',
            '--disable-sync',
          ],
        });
        await scenario(browser, pages);
      })(),
    ]);
  } catch (err) {
    failed = err;
  }

  await screenshots(pages, failed ? '-failure' : '');
  if (browser) await browser.close().catch(() => {});

  if (failed) {
    console.error(`\nFAIL: ${failed.message}`);
    for (const [name, p] of Object.entries(pages)) {
      for (const line of [...p.errors, ...p.console]) console.error(`  [${name}] ${line}`);
    }
    return 1;
  }
  console.log('\nPASS: demo page end to end');
  return 0;
}

async function scenario(browser, pages) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 820 } });
  for (const name of ['alice', 'bob']) {
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_TIMEOUT_MS);
    const entry = { page, errors: [], console: [] };
    page.on('pageerror', (err) => entry.errors.push(`page error: ${err.message}`));
    page.on('console', (msg) => {
      if (msg.type() === 'error' || msg.type() === 'warning') entry.console.push(`console.${msg.type()}: ${msg.text()}`);
    });
    pages[name] = entry;
  }
  const alice = pages.alice.page;
  const bob = pages.bob.page;

  await step('pages load', async () => {
    for (const [name, { page }] of Object.entries(pages)) {
      const response = await page.goto(`${base}/?user=${name}`);
      check(response?.ok(), `GET ${base}/?user=${name} answered ${response?.status()}`);
    }
  });

  await step('#status says "connected" on both pages', async () => {
    for (const { page } of Object.values(pages)) {
      await waitFor(page, 'status connected', () => document.querySelector('#status')?.textContent.trim() === 'connected');
    }
  });

  await step('#members lists alice and bob on both pages', async () => {
    for (const { page } of Object.values(pages)) {
      await waitFor(page, 'members alice and bob', () => {
        const text = document.querySelector('#members')?.textContent ?? '';
        return text.includes('alice') && text.includes('bob');
      });
    }
  });

  const nonce = Date.now().toString(36);
  const fromAlice = `hello from alice ${nonce}`;
  const fromBob = `hi alice, bob here ${nonce}`;

  await step('alice says something; bob and alice see it', async () => {
    await sendChat(alice, fromAlice);
    await waitForMessage(bob, 'alice', fromAlice);
    await waitForMessage(alice, 'alice', fromAlice);
  });

  await step('bob replies; alice sees it', async () => {
    await sendChat(bob, fromBob);
    await waitForMessage(alice, 'bob', fromBob);
    await waitForMessage(bob, 'bob', fromBob);
  });

  await step('publish 42.5 through the API; #latest-value and the chart show it', async () => {
    const reply = await publish('42.5');
    check(reply.sessions >= 2, `publish reached ${reply.sessions} sessions, expected both pages (>= 2)`);
    for (const { page } of Object.values(pages)) {
      await waitFor(page, 'latest value 42.5', () => document.querySelector('#latest-value')?.textContent === '42.5');
      const points = await dataPoints(page);
      check(points >= 1, `#chart data-points is ${points}, expected >= 1`);
    }
  });

  await step('two more values make the chart grow', async () => {
    const before = await dataPoints(alice);
    await publish('43.25');
    await publish('41.75');
    for (const { page } of Object.values(pages)) {
      await waitFor(page, 'latest value 41.75', () => document.querySelector('#latest-value')?.textContent === '41.75');
    }
    const after = await dataPoints(alice);
    check(after >= before + 2, `#chart data-points went from ${before} to ${after}, expected +2`);
  });

  await step('no uncaught errors in the pages', async () => {
    for (const [name, { errors }] of Object.entries(pages)) {
      check(errors.length === 0, `${name}: ${errors.join('; ')}`);
    }
  });
}

// --- helpers -------------------------------------------------------------------

async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
  } catch (err) {
    err.message = `${name}: ${err.message}`;
    throw err;
  }
  console.log(`ok - ${name} (${Date.now() - started} ms)`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

/** Waits for `predicate` (run in the page) to return true. */
async function waitFor(page, what, predicate, arg) {
  try {
    // Poll on a timer: requestAnimationFrame polling stalls in background pages.
    await page.waitForFunction(predicate, arg, { timeout: STEP_TIMEOUT_MS, polling: 100 });
  } catch (err) {
    const status = await page.locator('#status').textContent().catch(() => '?');
    throw new Error(`${page.url()}: waiting for ${what} failed (#status: "${status}"): ${err.message.split('\n')[0]}`);
  }
}

/** Types `text` into #chat-input and clicks #chat-send. */
async function sendChat(page, text) {
  // Only the front tab gets animation frames, which Playwright's
  // actionability checks wait for; a background tab makes click() crawl.
  await page.bringToFront();
  await page.fill('#chat-input', text);
  await page.click('#chat-send');
}

/** Waits for a `.message` in #messages containing both the sender and the text. */
function waitForMessage(page, sender, text) {
  return waitFor(
    page,
    `message from ${sender}: "${text}"`,
    ([sender, text]) =>
      [...document.querySelectorAll('#messages .message')].some(
        (m) => m.textContent.includes(sender) && m.textContent.includes(text),
      ),
    [sender, text],
  );
}

async function dataPoints(page) {
  return Number(await page.locator('#chart').getAttribute('data-points'));
}

/** POST /api/publish {"topic":"demo.value","data":value}; returns the JSON reply. */
async function publish(value) {
  const response = await fetch(`${base}/api/publish`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ topic: 'demo.value', data: value }),
    signal: AbortSignal.timeout(STEP_TIMEOUT_MS),
  });
  const body = await response.text();
  check(response.status === 200, `POST /api/publish answered ${response.status}: ${body}`);
  try {
    return JSON.parse(body);
  } catch {
    throw new Error(`POST /api/publish answered 200 with a body that is not JSON: ${body}`);
  }
}

async function screenshots(pages, suffix) {
  const dir = process.env.SCREENSHOT_DIR;
  if (!dir) return;
  const { mkdir } = await import('node:fs/promises');
  const { join } = await import('node:path');
  await mkdir(dir, { recursive: true });
  for (const [name, { page }] of Object.entries(pages)) {
    const path = join(dir, `demo-${name}${suffix}.png`);
    await page.screenshot({ path, fullPage: true }).then(
      () => console.log(`screenshot: ${path}`),
      (err) => console.error(`screenshot ${path} failed: ${err.message}`),
    );
  }
}
