"""Session affinity for the thinker and the talker: every turn of a session goes to the replica that keeps its KV.

Serve's mechanism for this is a custom request router (`RequestRouterConfig(request_router_class=...)`, the
`ray.serve.request_router` API; Ray Serve LLM's `PrefixCacheAffinityRouter` is one). It runs in each caller's
process (for the thinker the ingress, and the talker, which calls it for spoken replies; for the talker Code2Wav,
and the ingress ending a session), sees the call's arguments, and ranks the replicas for it. This one reads the
session off the call (the `session` of a `ThinkerJob` or `SpeechJob`, or a `session=` keyword as `end_session` and
`describe` take it) and ranks the replicas by rendezvous hashing of (session, replica id):
  * every caller computes the same replica from the same replica set, with nothing to share or wait for;
  * when that replica goes away (dead, or scaled down), only its sessions move, each to the next replica of its own
    ranking, which re-prefills the turn from the full conversation the job carries (no error, just one slower turn);
    a replica added later takes over about 1/n of the sessions the same way;
  * the replicas after the first are the fallback Serve tries when the first is full (`max_ongoing_requests`):
    a turn then runs elsewhere with a fresh prefill rather than waiting.
Calls without a session are routed as Serve's default router does: the less loaded of two random replicas.

Not model multiplexing (`@serve.multiplexed`, `multiplexed_model_id=session`), though it is Serve's stable way to
pin work to replicas: a replica announces the ids it holds through the controller (a push every 0.1 s, then a long
poll to every caller), and a turn routed before that arrives goes to the replica with the fewest ids instead; its
LRU would also be a second bookkeeping of the kept sessions beside the engine's token-bounded one.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica


def session_of(request: PendingRequest | None) -> str | None:
    """The session a call belongs to: a `session=` keyword, or the `session` of its first argument (a job)."""
    if request is None:
        return None
    if request.kwargs.get("session") is not None:
        return request.kwargs["session"]
    return getattr(request.args[0], "session", None) if request.args else None


def rendezvous_order(session: str, replica_ids: list[str]) -> list[str]:
    """The replica ids by the session's preference, best first (highest rendezvous hash)."""
    def score(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{session}\0{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=score, reverse=True)


class SessionAffinityRouter(LocalityMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        session = session_of(pending_request)
        if session is None:
            return self._two_random(pending_request)
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        ranked = [by_id[i] for i in rendezvous_order(session, list(by_id))]
        pending_request.routing_context.should_backoff = True  # all full: wait before asking again
        return [ranked[:1], ranked[1:]]  # the session's replica, then (when it is full) the others

    def _two_random(self, pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        """Serve's default: two random replicas (local ones first, when the deployment prefers them), the less
        loaded of which takes the call."""
        ids = list(self.apply_locality_routing(pending_request))
        return [[self.curr_replicas[i] for i in random.sample(ids, min(2, len(ids)))]] if ids else []
