# Local stand-in for python:3.11-slim, for scripts/compose-check.sh only (no registry pull needed).
# BASE is a Debian bookworm minbase root made by debootstrap and `docker import`ed by the script.
ARG BASE
FROM ${BASE}
# The build host's CA bundle, under its own name (no Debian package rewrites it): pip in the builds
# and at run time trusts what the host trusts.
COPY host-ca.crt /etc/ssl/certs/divmerge-host-ca.crt
ENV PIP_CERT=/etc/ssl/certs/divmerge-host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/divmerge-host-ca.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/divmerge-host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && ln -s /opt/venv/bin/python /usr/local/bin/python
CMD ["python"]
