#!/usr/bin/env bash
# Put the canary's stack-file change on main: `direct` pushes one commit by the canary bot, `pull-request`
# pushes a branch and opens a pull request (merged like any change). Used by .github/workflows/canary.yml.
#   scripts/canary-commit.sh direct|pull-request TITLE BODY
# Needs STACK and GH_TOKEN (the CANARY_BOT_TOKEN secret: a token that may push to main and whose pull
# requests start workflows, which GITHUB_TOKEN's do not; docs/ci.md#canary-bot).
set -euo pipefail
mode="$1" title="$2" body="$3"
file="stacks/Pulumi.${STACK:?}.yaml"
: "${GH_TOKEN:?missing secret CANARY_BOT_TOKEN: see docs/ci.md#canary-bot}"
base="${GITHUB_BASE:-main}"
git config user.name "infermesh canary bot"
git config user.email "infermesh-canary@users.noreply.github.com"
auth="AUTHORIZATION: basic $(printf 'x-access-token:%s' "$GH_TOKEN" | base64 -w0)"
remote="https://github.com/${GITHUB_REPOSITORY:?}.git"
git commit --quiet -m "$title" -m "$body" -- "$file"
case "$mode" in
  direct)
    # The edit was made on the deployed commit; main may have moved since: replay the one-file commit
    # on top of main as it is (a conflict fails the job: for a promote, the rollback job then runs).
    for _ in 1 2 3; do
      git -c http.extraheader="$auth" fetch --quiet --no-tags "$remote" "$base"
      git rebase --quiet FETCH_HEAD
      if git -c http.extraheader="$auth" push --quiet "$remote" "HEAD:refs/heads/$base"; then
        echo "committed to $base: $title"; exit 0
      fi
    done
    echo "could not push to $base three times in a row; see docs/ci.md#canary-bot" >&2; exit 1 ;;
  pull-request)
    branch="canary/${STACK}-${GITHUB_RUN_ID:?}-${GITHUB_RUN_ATTEMPT:-1}"
    git -c http.extraheader="$auth" push --quiet "$remote" "HEAD:refs/heads/$branch"
    gh pr create --repo "$GITHUB_REPOSITORY" --base "$base" --head "$branch" --title "$title" --body "$body"
    ;;
  *) echo "canary_commits is $mode: use pull-request or direct" >&2; exit 2 ;;
esac
