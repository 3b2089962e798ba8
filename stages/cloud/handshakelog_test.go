package cloud

import (
	"log/slog"
	"net"
	"strings"
	"testing"

	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
)

// TestFailedHandshakesAreLoggedOnce: a client that connects and never
// authenticates costs one counter tick, not one log line. On main every
// such connection logged "handshake failed" at INFO, so anyone who
// reached the port could flood the log.
func TestFailedHandshakesAreLoggedOnce(t *testing.T) {
	const conns = 50
	var logs logtest.Buffer
	n := startNodeLogged(t, func(*config.Cloud) {}, slog.New(slog.NewTextHandler(&logs, nil)))
	for range conns {
		c, err := net.Dial("tcp", n.tcpAddr)
		if err != nil {
			t.Fatal(err)
		}
		_ = c.Close() // no auth packet: the handshake fails reading it
	}
	waitFor(t, "every handshake to fail", func() bool { return n.st.HandshakeFailures() == conns })
	if got := strings.Count(logs.String(), "handshake failed"); got != 1 {
		t.Fatalf("%d failed handshakes logged %d lines, want 1 per %v:\n%s", conns, got, logEvery, logs.String())
	}
	// A client that authenticates still gets in.
	n.connect(t, "tcp", claims{Mid: 1, Key: "k"})
}
