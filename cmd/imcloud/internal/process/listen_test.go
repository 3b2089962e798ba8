package process

import (
	"net"
	"strings"
	"testing"
)

// TestLoopbackNameMustBindLoopback: config.IsLoopback trusts the name
// "localhost", and on main a localhost that /etc/hosts mapped to 0.0.0.0
// served unauthenticated gRPC on every interface. What was bound must be
// loopback when the address was judged so.
func TestLoopbackNameMustBindLoopback(t *testing.T) {
	bound := func(addr string) net.Listener {
		t.Helper()
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = ln.Close() })
		return ln
	}
	// A listener on every interface stands for what "localhost:3119"
	// binds when /etc/hosts says "0.0.0.0 localhost".
	everywhere := bound("0.0.0.0:0")
	loopback := bound("127.0.0.1:0")
	tests := []struct {
		name, addr string
		ln         net.Listener
		wantErr    bool
	}{
		{"localhost bound beyond loopback", "localhost:3119", everywhere, true},
		{"LOCALHOST bound beyond loopback", "LOCALHOST:3119", everywhere, true},
		{"loopback IP bound beyond loopback", "127.0.0.1:3119", everywhere, true},
		{"localhost bound to loopback", "localhost:3119", loopback, false},
		{"every interface on purpose", ":3119", everywhere, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkLoopback("logic.grpc_addr", tt.addr, tt.ln)
			if (err != nil) != tt.wantErr {
				t.Fatalf("checkLoopback(%q, bound %s) = %v, want error %v", tt.addr, tt.ln.Addr(), err, tt.wantErr)
			}
			if err != nil && !strings.Contains(err.Error(), "logic.grpc_addr") {
				t.Fatalf("error %q does not name the key", err)
			}
		})
	}
}

// TestListenBindsLoopbackName: the real localhost binds and passes.
func TestListenBindsLoopbackName(t *testing.T) {
	ln, err := listen("cloud.grpc_addr", "localhost:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ip := ln.Addr().(*net.TCPAddr).IP; !ip.IsLoopback() {
		t.Fatalf("bound %s", ip)
	}
}
