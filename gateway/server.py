"""Run the gateway: `python -m gateway --recall ADDR [--recall ADDR ...] --ranking ADDR`."""

from __future__ import annotations

import argparse
import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gateway.admission import Admission, AdmissionConfig
from gateway.backends import GrpcRanking, GrpcRecall, RankingReplicas
from gateway.catalogue import Catalogue
from gateway.config import DEFAULT_PORT, GatewayConfig
from gateway.events import EventStore, open_event_store, store_settings
from gateway.exposures import ExposureConfig, ExposureLog
from gateway.funnel import Funnel
from gateway.group_commit import GroupCommit
from gateway.observe import GatewayObserver, ObservingInterceptor
from gateway.rollout import Rollout, VariantVersions
from gateway.servicer import RecommenderServicer, RolloutServicer
from protos.auth import (
    CLIENT_TOKENS_ENV,
    INTERNAL_TOKEN_ENV,
    AuthConfigError,
    TlsFiles,
    add_internal_auth_arguments,
    client_tokens,
    internal_token,
)
from protos.recfunnel.v1 import recommender_pb2, recommender_pb2_grpc, versions_pb2, versions_pb2_grpc
from protos.serving import ServerHandle, freeze_loaded_objects, start_server

SERVICE_NAME = recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].full_name
ROLLOUT_SERVICE_NAME = versions_pb2.DESCRIPTOR.services_by_name["Rollout"].full_name


@dataclass
class Gateway:
    handle: ServerHandle
    events: EventStore
    shards: list[GrpcRecall]
    ranking: RankingReplicas
    funnel: Funnel
    rollout: Rollout
    appender: GroupCommit
    admission: Admission
    exposures: ExposureLog

    @property
    def address(self) -> str:
        return self.handle.address

    def retarget(self, recall_addresses: list[str], ranking_addresses: list[str]) -> bool:
        """Follow services that moved (a restarted actor listens on a new port); True if any did.

        The old channels are left to close with the gateway: a call still running on one
        finishes there, and nothing new is sent to it.
        """
        if len(recall_addresses) != len(self.shards):
            raise ValueError(f"{len(recall_addresses)} recall addresses for {len(self.shards)} shards")
        moved = self.ranking.retarget(ranking_addresses)
        for shard, address in zip(self.shards, recall_addresses, strict=True):
            if shard.address != address:
                shard.connect(address)
                moved = True
        return moved

    async def stop(self, grace: float = 2.0) -> None:
        await self.handle.stop(grace)
        await self.exposures.close()  # every answer given so far is in the log before the store closes
        for shard in self.shards:
            await shard.close()
        await self.ranking.close()
        self.admission.close()
        self.appender.close()
        self.events.close()


async def start(config: GatewayConfig, observer: GatewayObserver | None = None) -> Gateway:
    """Start the gateway; `observer` hears of every public call (metrics), none by default."""
    shards = [GrpcRecall(address, config.internal_token) for address in config.recall_addresses]
    ranking = RankingReplicas([GrpcRanking(address, config.internal_token) for address in config.ranking_addresses])
    funnel = Funnel(shards, ranking, dict(config.channel_budgets), config.explain_top)
    events = open_event_store(config.store_location())
    catalogue = Catalogue(shards, ranking, events)
    appender = GroupCommit(events)
    admission = Admission(config.admission)
    executor = ThreadPoolExecutor(4, thread_name_prefix="gateway")
    exposures = ExposureLog(events, config.exposures, executor)
    rollout = Rollout(funnel, catalogue, ranking, shards, config.swap_drain_s, admission=admission)
    servicer = RecommenderServicer(funnel, catalogue, events, config, executor, appender, admission, exposures,
                                   VariantVersions(rollout))
    freeze_loaded_objects()
    handle = await start_server(
        config.host, config.port,
        [lambda server: recommender_pb2_grpc.add_RecommenderServicer_to_server(servicer, server),
         lambda server: versions_pb2_grpc.add_RolloutServicer_to_server(RolloutServicer(rollout), server)],
        [SERVICE_NAME, ROLLOUT_SERVICE_NAME],
        tokens=config.tokens, tls=config.tls,
        interceptors=[ObservingInterceptor(observer)] if observer is not None else (),
    )
    return Gateway(handle, events, shards, ranking, funnel, rollout, appender, admission, exposures)


async def serve(config: GatewayConfig) -> None:
    gateway = await start(config)
    try:
        await gateway.handle.server.wait_for_termination()
    finally:
        await gateway.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__)
    parser.add_argument("--recall", action="append", required=True, help="recall shard address (repeat)")
    parser.add_argument("--ranking", action="append", required=True,
                        help="ranking service address (repeat for replicas)")
    parser.add_argument("--db", default="recfunnel.sqlite",
                        help="event store: a SQLite file, or a postgresql://user@host/db URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--tokens-file", type=Path, default=None,
                        help=f"client bearer tokens, one per line (else ${CLIENT_TOKENS_ENV}, comma-separated)")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM certificate chain of the public port")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM private key of the public port")
    parser.add_argument("--no-admission", action="store_true",
                        help="admit every call however loaded (admission control off: for comparisons)")
    parser.add_argument("--no-exposures", action="store_true",
                        help="log no exposures (what answers showed): for comparisons")
    add_internal_auth_arguments(parser)
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    try:
        tokens, internal = client_tokens(args.tokens_file), internal_token(args.internal_token_file)
    except AuthConfigError as error:
        parser.error(str(error))
    if not args.no_auth and not (tokens and internal):
        parser.error(f"auth is on by default: give client tokens (--tokens-file or ${CLIENT_TOKENS_ENV}) and the "
                     f"internal token (--internal-token-file or ${INTERNAL_TOKEN_ENV}), or --no-auth")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(serve(GatewayConfig(
        recall_addresses=tuple(args.recall), ranking_addresses=tuple(args.ranking), **store_settings(args.db),
        host=args.host, port=args.port, tokens=() if args.no_auth else tokens, internal_token=internal,
        tls=TlsFiles(args.tls_cert, args.tls_key) if args.tls_cert else None,
        admission=AdmissionConfig(enabled=not args.no_admission),
        exposures=ExposureConfig(enabled=not args.no_exposures))))
