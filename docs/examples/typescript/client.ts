// Call an MCP server behind toolio-sidecar with the MCP TypeScript SDK (docs/agent-developers.md).
// Run by tests/deploy/test_docs_examples.py against a real sidecar.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport, StreamableHTTPError } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { pathToFileURL } from "node:url";

export async function callWhoami(url: string, key: string): Promise<unknown> {
  const transport = new StreamableHTTPClientTransport(new URL(url), {
    requestInit: { headers: { Authorization: `Bearer ${key}` } },
  });
  const client = new Client({ name: "toolio-example", version: "1.0.0" });
  await client.connect(transport);
  try {
    const result = await client.callTool({ name: "whoami", arguments: {} });
    return result.structuredContent;
  } finally {
    await client.close();
  }
}

// node client.js URL KEY: the whoami result, or the error the SDK reports.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [url, key] = process.argv.slice(2);
  try {
    console.log(JSON.stringify({ whoami: await callWhoami(url!, key!) }));
  } catch (error) {
    // StreamableHTTPError carries the HTTP status (code) and the sidecar's JSON error body.
    const status = error instanceof StreamableHTTPError ? `HTTP ${error.code}: ` : "";
    console.log(JSON.stringify({ error: status + (error as Error).message }));
  }
}
