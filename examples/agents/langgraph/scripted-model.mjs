// @ts-check
// A scripted chat model standing in for the LLM, so that the example runs
// (and is tested) without an API key. It is a LangChain chat model like
// ChatOpenAI or ChatAnthropic: LangGraph drives it the same way.
//
// Its script is the one turn of a shopping agent: to a person's request it
// answers with a call of the `buy` tool (the order it was given), and once
// the tool has answered it writes the final answer from what the tool
// returned, as a model relaying a tool result would. LangChain's own fakes
// (`FakeListChatModel`, `FakeStreamingChatModel` in
// `@langchain/core/utils/testing`) answer from a fixed list and so cannot put
// the tool's answer (the order id, or the refusal) into the final answer.

import { BaseChatModel } from '@langchain/core/language_models/chat_models';
import { AIMessage, ToolMessage } from '@langchain/core/messages';

/** @typedef {import('@langchain/core/messages').BaseMessage} BaseMessage */
/** @typedef {{ name: string, args: Record<string, unknown> }} ScriptedCall */

export class ScriptedChatModel extends BaseChatModel {
  /** @param {{ call: ScriptedCall }} fields the tool call to make */
  constructor(fields) {
    super({});
    this.call = fields.call;
    this.turns = 0;
  }

  _llmType() {
    return 'scripted';
  }

  /**
   * A real model is told its tools here; the script already knows its one
   * call, so binding changes nothing.
   * @param {unknown[]} _tools
   */
  bindTools(_tools) {
    return this;
  }

  /** @param {BaseMessage[]} messages */
  async _generate(messages) {
    this.turns += 1;
    const last = messages[messages.length - 1];
    const message = ToolMessage.isInstance(last)
      ? new AIMessage(String(last.content))
      : new AIMessage({
          content: '',
          tool_calls: [
            { id: `call_${this.turns}`, name: this.call.name, args: this.call.args, type: 'tool_call' },
          ],
        });
    return { generations: [{ message, text: typeof message.content === 'string' ? message.content : '' }] };
  }
}
