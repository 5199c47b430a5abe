"""One loopback SparkSession builder, for the Spark preparation engine and the Spark backend."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

from core.errors import RecsysError
from core.signals import reinstall as reinstall_stop_signals


def spark_session(master: str, app_name: str = "recsys-prepare", flag: str = "--engine spark") -> Any:
    """A SparkSession on ``master`` bound to loopback, with executors using this interpreter."""
    if shutil.which("java") is None:
        raise RecsysError(f"{flag}: Java not found on PATH (Spark needs Java 17, e.g. openjdk-17-jre-headless)")
    from pyspark.sql import SparkSession

    # Python workers start from PYSPARK_PYTHON (the spark.pyspark.python conf is not read in local
    # mode); without it executors run the system python3, which lacks this environment's packages.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    session = (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    reinstall_stop_signals()  # the SparkContext took SIGINT (to raise KeyboardInterrupt): one policy for all
    return session
