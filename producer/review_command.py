"""`patchq review RUN`: serve the review page of one run on this machine, with logins."""

from __future__ import annotations

import argparse

from common.errors import PatchqError
from common.settings import Settings, parse_logins
from common.store.connection import open_database
from common.store.run_rows import resolve_run
from producer.flower_command import add_listen_arguments


class ReviewSetupError(PatchqError):
    """The review page cannot start as configured."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "review",
        help="serve a page to mark a run's flagged images as defect or false alarm",
        description=(
            "Serve the run's scored images per category, flagged first, with their anomaly "
            "maps; reviewers mark each defect or normal with the keyboard, and every verdict "
            "is a row of the reviews table. Logins: PATCHQ_REVIEW_BASIC_AUTH (user:password, "
            "comma-separated, one per reviewer). Verdicts then label the run for `patchq "
            "aggregate` and teach the model with `patchq fit --update CATEGORY --from-run RUN`."
        ),
    )
    parser.add_argument("run_ref", metavar="RUN", help="run id or name")
    add_listen_arguments(parser, "PATCHQ_REVIEW_PORT")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.load({"review_port": args.port})
    if not settings.review_basic_auth:
        raise ReviewSetupError(
            "the review page needs logins: set PATCHQ_REVIEW_BASIC_AUTH=user:password "
            "(comma-separate one per reviewer; verdicts record the user)"
        )
    from tornado.ioloop import IOLoop  # the server's imports stay out of every other command

    from review.app import ReviewContext, make_app

    with open_database(settings.database_url) as (_, sessions):
        with sessions() as session:
            run_id, run_name = resolve_run(session, args.run_ref)
        logins = parse_logins(settings.review_basic_auth)
        context = ReviewContext(run_id, run_name, sessions, logins)
        try:
            make_app(context).listen(settings.review_port, address=args.address)
        except OSError as error:
            raise ReviewSetupError(
                f"cannot listen on {args.address}:{settings.review_port} ({error.strerror}); "
                "choose another port with --port or PATCHQ_REVIEW_PORT"
            ) from None
        print(
            f"review page of run {run_name or run_id} on "
            f"http://{args.address}:{settings.review_port}/ (Ctrl-C stops it)",
            flush=True,
        )
        IOLoop.current().start()
    return 0
