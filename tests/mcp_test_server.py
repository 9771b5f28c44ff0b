"""A real MCP server (the official SDK's MCPServer) for the MCP tests: ``python mcp_test_server.py [--http PORT]
[--fail-start]``. Its tools cover each kind of result and fault the client must handle."""

from __future__ import annotations

import argparse
import os
import sys
import time

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.utilities.types import Image

# a 1x1 red PNG
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c63f8cfc0f01f0005000201a2b5cb0f0000000049454e44ae426082"
)

server = MCPServer("qwen-agent-test")


@server.tool(description="Add two integers.")
def add(a: int, b: int) -> str:
    return str(a + b)


@server.tool(description="Return a 1x1 PNG and a caption.")
def draw() -> list:
    return ["a red dot", Image(data=PNG, format="png")]


@server.tool(description="Always reports an error.")
def broken(reason: str) -> str:
    raise ValueError(f"broken on purpose: {reason}")


@server.tool(description="Never answers.")
def hang() -> str:
    time.sleep(3600)
    return "late"


@server.tool(description="Kills this server process mid-call.")
def crash() -> str:
    os._exit(3)


@server.tool(description="Read an environment variable of the server.")
def getenv(name: str) -> str:
    return os.environ.get(name, "<unset>")


@server.tool(description="The server's process id.")
def pid() -> str:
    return str(os.getpid())


@server.tool(description="Start a child process that sleeps, and return its pid.")
def spawn() -> str:
    child = os.fork()
    if child == 0:
        time.sleep(3600)
        os._exit(0)
    return str(child)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=None)
    parser.add_argument("--fail-start", action="store_true")
    parser.add_argument("--tag", default="", help="a marker in the command line, for finding the process")
    args = parser.parse_args()
    if args.fail_start:
        print("test server: cannot open its database (refusing to start)", file=sys.stderr)
        sys.exit(2)
    if args.http:
        server.run("streamable-http", host="127.0.0.1", port=args.http)
    else:
        server.run()
