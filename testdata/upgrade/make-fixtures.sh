#!/usr/bin/env bash
# Makes the upgrade fixtures under testdata/upgrade/<commit>/ with the PREVIOUS release's code.
#
# The previous release is commit 6207a77 (2026-11-28, "hub ledger: one fixed_chunks helper ..."),
# the last commit before the hardening round of 2026-12-03/04, which bumped the store's table
# versions (audit-1 -> audit-2 and people-credentials-1 -> people-credentials-2 with keys/audit.key
# and keys/credential.key, 76377df), added tables (edge fallback-1, hub device-day-records-1,
# recent-refusals-1, revocations-1, ...) and moved sync from kipass/sync/1 to kipass/sync/2
# (5cd9ab3). Its stores are what an operator upgrading from that release has on disk.
#
# What it does: a git worktree of that commit, a debug build of its edge-node, sync-hub and of
# make_fixtures.rs (copied into the worktree as a bin of its `tests` crate, so it links that
# commit's crates), then the program writes hub/, edge/, authority-identity.txt and
# expected.json (see make_fixtures.rs for the timeline). The worktree is removed afterwards.
#
# Usage: testdata/upgrade/make-fixtures.sh [COMMIT]   (from the repository; takes a while)
# KEEP_TARGET=/path/to/target starts the old build from a copy of an existing target/debug;
# OLD_WORKTREE=/path uses an existing worktree of the commit instead of making one.
set -euo pipefail
commit=${1:-6207a77}
repo=$(git rev-parse --show-toplevel)
full=$(git -C "$repo" rev-parse "$commit^{commit}")
short=${full:0:7}
out="$repo/testdata/upgrade/$short"
if [ -n "${OLD_WORKTREE:-}" ]; then
    # A worktree of that commit made beforehand (left in place).
    old=$OLD_WORKTREE
    [ "$(git -C "$old" rev-parse HEAD)" = "$full" ] || { echo "$old is not at $full" >&2; exit 1; }
else
    old=$(mktemp -d "${TMPDIR:-/tmp}/kipass-old-XXXXXX")/wt
    trap 'git -C "$repo" worktree remove --force "$old" 2>/dev/null || true; rm -rf "$(dirname "$old")"' EXIT
    git -C "$repo" worktree add --detach "$old" "$full"
fi
if [ -n "${KEEP_TARGET:-}" ]; then
    mkdir -p "$old/target" && cp -a "$KEEP_TARGET/debug" "$old/target/"
fi
cp "$repo/testdata/upgrade/make_fixtures.rs" "$old/tests/src/bin/make_upgrade_fixtures.rs"
(cd "$old" && cargo build -p edge-node -p sync-hub --bins && cargo build -p tests --bin make_upgrade_fixtures)
rm -rf "$out"
"$old/target/debug/make_upgrade_fixtures" "$out" "$full"
echo "fixtures in $out ($(du -sh "$out" | cut -f1))"
