"""LitData's ``s3://`` access, also for S3-compatible stores served over plain http (MinIO, Ceph RGW, ...).

LitData (0.2.76) fetches chunks with obstore, whose S3 store it builds with client options of its own that leave out
``allow_http``; those replace the ones obstore would read from the environment (``AWS_ALLOW_HTTP``), so with an
``http://`` endpoint (``AWS_ENDPOINT_URL``) every chunk fetch fails ("HTTP error: builder error", the reqwest
client refusing the scheme; cf. developmentseed/obstore#159). ``S3Downloader`` is LitData's own with ``allow_http``
added for exactly those endpoints; importing this module registers it for ``s3://`` in this process (forked and
spawned workers import it too, through the datasets they unpickle). https endpoints and AWS itself take LitData's
store unchanged.
"""

from __future__ import annotations

from typing import Any

from litdata.streaming import downloader as litdata_downloader
from obstore.store import S3Store


class S3Downloader(litdata_downloader.S3Downloader):
    """LitData's S3 downloader whose obstore store may use an ``http://`` endpoint."""

    def _get_store(self, bucket: str) -> Any:
        store = super()._get_store(bucket)  # LitData's, built once per process and kept in ``self._store``
        if store.config.get("endpoint", "").startswith("http://") and not store.client_options.get("allow_http"):
            store = S3Store(config=store.config, client_options={**store.client_options, "allow_http": True},
                            credential_provider=store.credential_provider, retry_config=store.retry_config)
            self._store = store
        return store


litdata_downloader.register_downloader("s3://", S3Downloader, overwrite=True)
