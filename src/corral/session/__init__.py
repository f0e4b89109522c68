"""Workspaces and agent tools: a project copied into a sandbox, a git commit per tool call, review,
rollback and sync back (see `corral.session.session`)."""

from __future__ import annotations

from corral.session.history import Changes, FileChange, Step
from corral.session.session import Session
from corral.session.store import SessionInfo, list_sessions, remove_session, sessions_dir
from corral.session.sync import SyncItem, SyncReport
from corral.session.tools import (
    SPECS,
    BashResult,
    DirEntry,
    EditResult,
    ListResult,
    Match,
    ReadResult,
    SearchResult,
    WriteResult,
)
from corral.session.workspace import CopyReport

__all__ = [
    "SPECS",
    "BashResult",
    "Changes",
    "CopyReport",
    "DirEntry",
    "EditResult",
    "FileChange",
    "ListResult",
    "Match",
    "ReadResult",
    "SearchResult",
    "Session",
    "SessionInfo",
    "Step",
    "SyncItem",
    "SyncReport",
    "WriteResult",
    "list_sessions",
    "remove_session",
    "sessions_dir",
]
