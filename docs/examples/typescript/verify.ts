// Verify toolio-sidecar's X-Toolio-Assertion in a TypeScript MCP server, with jose
// (docs/server-authors.md). Run by tests/deploy/test_docs_examples.py against a real sidecar.
import { createRemoteJWKSet, jwtVerify, type JWTPayload } from "jose";
import { pathToFileURL } from "node:url";

export interface ToolioIdentity {
  keyId: string;
  keyName: string;
  workspace: string;
  roles: string[];
  permissions: string[];
}

interface ToolioClaims extends JWTPayload {
  name: string;
  ws: string;
  roles: string[];
  perms: string[];
  htm: string;
  htu: string;
}

/** Remembers each jti until its assertion expires, so a copied header is refused (one process;
 *  with several server processes use a shared store, e.g. Redis SET jti 1 NX EXAT exp). */
export class ReplayCache {
  private seen = new Map<string, number>();

  checkAndRemember(jti: string, expiresAt: number): void {
    const now = Date.now() / 1000;
    if (this.seen.size > 10_000) {
      for (const [id, until] of this.seen) if (until <= now) this.seen.delete(id);
    }
    if ((this.seen.get(jti) ?? 0) > now) throw new Error("assertion already used");
    this.seen.set(jti, expiresAt);
  }
}

export interface VerifierOptions {
  issuer?: string;
  audience?: string;
  clockToleranceSeconds?: number;
  replayCache?: ReplayCache;
}

/** A verifier for one sidecar's JWKS (keys cached; fetched again for an unknown kid). */
export function toolioVerifier(jwksUrl: string, options: VerifierOptions = {}) {
  const jwks = createRemoteJWKSet(new URL(jwksUrl));
  const tolerance = options.clockToleranceSeconds ?? 30;
  return async function verify(token: string, method: string, pathQs: string): Promise<ToolioIdentity> {
    const { payload } = await jwtVerify<ToolioClaims>(token, jwks, {
      issuer: options.issuer ?? "toolio-sidecar",
      audience: options.audience ?? "toolio-mcp",
      algorithms: ["ES256", "EdDSA"],
      typ: "toolio+jwt", // explicit typing (RFC 8725 3.11): not some other JWT
      clockTolerance: tolerance,
      requiredClaims: ["iat", "nbf", "exp", "jti", "sub", "htm", "htu"],
    });
    // Bound to one request: the method and the target (path + query) as your server received them.
    if (payload.htm !== method) throw new Error("the assertion was made for another method");
    if (payload.htu !== pathQs) throw new Error("the assertion was made for another path");
    options.replayCache?.checkAndRemember(payload.jti!, payload.exp! + tolerance);
    return {
      keyId: payload.sub!,
      keyName: payload.name,
      workspace: payload.ws,
      roles: payload.roles,
      permissions: payload.perms,
    };
  };
}

// node verify.js JWKS_URL TOKEN METHOD PATH: verify, then show what is refused.
async function main(jwksUrl: string, token: string, method: string, pathQs: string): Promise<void> {
  const verify = toolioVerifier(jwksUrl, { replayCache: new ReplayCache() });
  const refused = async (t: string, m: string, p: string): Promise<string> => {
    try {
      await verify(t, m, p);
      return "accepted";
    } catch (error) {
      return `refused: ${(error as Error).message}`;
    }
  };
  const identity = await verify(token, method, pathQs);
  const replay = await refused(token, method, pathQs);
  const [head, body, signature] = token.split(".");
  const claims = JSON.parse(Buffer.from(body!, "base64url").toString()) as ToolioClaims;
  const forgedBody = Buffer.from(JSON.stringify({ ...claims, perms: ["org:settings"] })).toString("base64url");
  const fresh = toolioVerifier(jwksUrl); // no replay cache: only the forgery or the path is refused
  const forged = await fresh(`${head}.${forgedBody}.${signature}`, method, pathQs).then(
    () => "accepted", (error: Error) => `refused: ${error.message}`);
  const otherPath = await fresh(token, method, pathQs + "&other=1").then(
    () => "accepted", (error: Error) => `refused: ${error.message}`);
  console.log(JSON.stringify({ identity, replay, forged, otherPath }));
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [jwksUrl, token, method, pathQs] = process.argv.slice(2);
  await main(jwksUrl!, token!, method!, pathQs!);
}
