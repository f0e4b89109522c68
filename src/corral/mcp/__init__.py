"""corral's MCP server: `corral mcp` (stdio or streamable HTTP) over one workspace session."""

from corral.mcp.server import CorralMCP

__all__ = ["CorralMCP"]
