#!/usr/bin/env node
// @ts-check
// A LangGraph agent whose `buy` tool calls the shop API through Countersign.
//
// The tool is a plain `fetch` to the gateway's URL: no SDK, no shop
// credential. It names the person it acts for (`x-countersign-user`, the
// identity the example configurations trust); the gateway holds the call
// until that person approves, forwards it with a fresh token, and answers
// with the shop's order, or with an application/problem+json refusal whose
// `code` and `detail` the tool hands back to the model to relay.
//
// The chat model is scripted (scripted-model.mjs) so that this runs without
// an LLM key; pass any LangChain chat model that supports tools to
// `buildAgent` instead.
//
//   cargo run -- dev        # in another terminal; approve on its approver page
//   npm ci --prefix examples/agents/langgraph
//   node examples/agents/langgraph/agent.mjs --product "XYZ phone" --qty 2 --price-limit 900 --user alice

import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';
import { tool } from '@langchain/core/tools';
import { HumanMessage } from '@langchain/core/messages';
import { StateGraph, MessagesAnnotation, START, END } from '@langchain/langgraph';
import { ToolNode, toolsCondition } from '@langchain/langgraph/prebuilt';
import { z } from 'zod';
import { ScriptedChatModel } from './scripted-model.mjs';

/**
 * @typedef {object} ShopOptions
 * @property {string} gateway the Countersign proxy in front of the shop, e.g. http://127.0.0.1:8080
 * @property {string} user the person the agent acts for; they approve each purchase
 * @property {number} [timeoutSeconds] how long the tool waits for the person's answer in all
 * @property {(line: string) => void} [progress] where the tool says what it is waiting for
 */

/**
 * The shop's `buy` tool: POST /shop through the gateway, the order or the
 * refusal as text for the model.
 * @param {ShopOptions} options
 */
export function buyTool({ gateway, user, timeoutSeconds = 330, progress = () => {} }) {
  const url = new URL('/shop', gateway);
  return tool(
    async ({ product, qty, priceLimit }) => {
      const deadline = Date.now() + timeoutSeconds * 1000;
      const body = JSON.stringify({ product, qty, priceLimit });
      progress(`asking ${user} to approve buying ${qty} ${product}`);
      // The retry contract (docs/agent.md): a 202 means the
      // person has not answered yet; the same call again after Retry-After
      // attaches to that approval (nobody is asked twice) and gets its answer.
      for (;;) {
        /** @type {Response} */
        let response;
        try {
          response = await fetch(url, {
            method: 'POST',
            headers: { 'content-type': 'application/json', 'x-countersign-user': user },
            body,
            signal: AbortSignal.timeout(Math.max(deadline - Date.now(), 1)),
          });
        } catch (error) {
          // Not known to be made: a retry of the same call would attach to
          // the approval if the gateway had one.
          const reason = error instanceof Error ? (error.cause ?? error).toString() : String(error);
          return `No order is known to have been placed (gateway_unreachable): cannot reach ${url}: ${reason}`;
        }
        if (response.status === 202) {
          const pending = await response.json().catch(() => ({}));
          const wait = Number(response.headers.get('retry-after')) || 5;
          progress(pending.detail ?? 'waiting for approval');
          if (Date.now() + wait * 1000 > deadline) {
            return `No order was placed yet (still_pending): ${user} has not answered; ask again later.`;
          }
          await new Promise((resolve) => setTimeout(resolve, wait * 1000));
          continue;
        }
        return describe(response);
      }
    },
    {
      name: 'buy',
      description: 'Buy a product from the shop for the user. The user approves every purchase on their phone first.',
      schema: z.object({
        product: z.string().describe('the product, e.g. "XYZ phone"'),
        qty: z.number().int().positive().describe('how many'),
        priceLimit: z.number().positive().describe('the most the user will pay for one'),
      }),
    },
  );
}

/**
 * What the model is told: the order when the shop made one (2xx), else the
 * refusal's code and the sentence Countersign wrote to be relayed. Anything
 * else is no order (fail closed).
 * @param {Response} response
 */
async function describe(response) {
  const text = await response.text();
  /** @type {any} */
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: said below
  }
  if (response.ok && body && typeof body === 'object') {
    return `Order ${body.order_id} ${body.status}: ${body.qty} x ${body.product} for ${body.buyer}.`;
  }
  const problem = (response.headers.get('content-type') ?? '').startsWith('application/problem+json');
  if (problem && body) {
    return `No order was placed (${body.code}): ${body.detail}`;
  }
  const reason = body?.error ?? `an answer that is not JSON (HTTP ${response.status})`;
  return `No order was placed (http_${response.status}): ${reason}`;
}

/**
 * The agent: a LangGraph graph of the model and its tools, looping until the
 * model answers without a tool call.
 * @param {{ model: import('@langchain/core/language_models/chat_models').BaseChatModel, tools: any[] }} parts
 */
export function buildAgent({ model, tools }) {
  if (!model.bindTools) throw new Error('the chat model must support tool calling');
  const bound = model.bindTools(tools);
  return new StateGraph(MessagesAnnotation)
    .addNode('model', async (state) => ({ messages: [await bound.invoke(state.messages)] }))
    .addNode('tools', new ToolNode(tools))
    .addEdge(START, 'model')
    .addConditionalEdges('model', toolsCondition, ['tools', END])
    .addEdge('tools', 'model')
    .compile();
}

async function main() {
  const { values } = parseArgs({
    options: {
      gateway: { type: 'string', default: process.env.COUNTERSIGN_URL ?? 'http://127.0.0.1:8080' },
      user: { type: 'string', default: 'alice' },
      product: { type: 'string', default: 'XYZ phone' },
      qty: { type: 'string', default: '1' },
      'price-limit': { type: 'string', default: '900' },
      timeout: { type: 'string', default: '330' },
      json: { type: 'boolean', default: false },
    },
  });
  const order = { product: values.product, qty: Number(values.qty), priceLimit: Number(values['price-limit']) };
  const buy = buyTool({
    gateway: values.gateway,
    user: values.user,
    timeoutSeconds: Number(values.timeout),
    progress: (line) => console.error(`agent: ${line}`),
  });
  const agent = buildAgent({ model: new ScriptedChatModel({ call: { name: 'buy', args: order } }), tools: [buy] });
  const request = `Buy ${order.qty} ${order.product} for me, at most ${order.priceLimit} each.`;
  const { messages } = await agent.invoke({ messages: [new HumanMessage(request)] });
  const answer = String(messages[messages.length - 1].content);
  if (values.json) {
    const steps = messages.map((m) => ({ type: m.getType(), content: m.content, tool_calls: 'tool_calls' in m ? m.tool_calls : undefined }));
    console.log(JSON.stringify({ answer, steps }));
  } else {
    console.log(answer);
  }
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  main().catch((error) => {
    console.error(`agent: ${error instanceof Error ? error.message : error}`);
    process.exitCode = 1;
  });
}
