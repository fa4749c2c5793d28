// An MCP client made with the official TypeScript SDK
// (StreamableHTTPClientTransport), for Countersign's integration tests:
//
//   node tests/mcp/client.mjs '<scenario JSON>'
//
// The scenario: { "url", "user" (sent as x-countersign-user; null: none),
// "headers" (optional: more headers on every request), "steps": [...] }
// where each step is { "list": true } (tools/list), or { "call": <tool>,
// "arguments": {...}, "timeout": ms, "progress": true (send a progressToken
// and reset the timeout on progress), "parallel": n (send it n times at once) }.
// It prints one JSON line per step to stdout: { "tools": [...] }, or
// { "results": [...], "progress": [messages] } where each result is a
// CallToolResult or { "error": { "code", "message" } }. At the end it ends
// its session (DELETE) and prints { "errors": [...], "logs": [...] }: what the
// SDK reported besides the results, and the server's log notifications; a failure of the transport exits non-zero.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { LoggingMessageNotificationSchema } from '@modelcontextprotocol/sdk/types.js';

const scenario = JSON.parse(process.argv[2]);
const headers = { ...(scenario.headers ?? {}) };
if (scenario.user !== null) headers['x-countersign-user'] = scenario.user;
const transport = new StreamableHTTPClientTransport(new URL(scenario.url), {
  requestInit: { headers },
});
const client = new Client({ name: 'countersign-test-client', version: '1.0.0' });
const errors = [];
client.onerror = (error) => errors.push(String(error));
const logs = [];
client.setNotificationHandler(LoggingMessageNotificationSchema, (n) => logs.push(n.params.data));
await client.connect(transport);

const print = (value) => process.stdout.write(`${JSON.stringify(value)}\n`);

for (const step of scenario.steps) {
  if (step.list) {
    const { tools } = await client.listTools();
    print({ tools: tools.map((t) => t.name) });
    continue;
  }
  const progress = [];
  const options = { timeout: step.timeout ?? 60000 };
  if (step.progress) {
    options.resetTimeoutOnProgress = true;
    options.onprogress = (p) => progress.push(p.message ?? String(p.progress));
  }
  const one = () =>
    client
      .callTool({ name: step.call, arguments: step.arguments ?? {} }, undefined, options)
      .catch((error) => ({ error: { code: error.code ?? null, message: String(error.message ?? error) } }));
  const results = await Promise.all(Array.from({ length: step.parallel ?? 1 }, one));
  print({ results, progress });
  if (step.pause) await new Promise((resolve) => setTimeout(resolve, step.pause));
}
// DELETE of the session, through the gateway like everything else.
await transport.terminateSession();
await client.close();
print({ errors, logs });
