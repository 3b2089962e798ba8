package clusterauth

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"imcloud/pipeline/config"
)

const testSecret = "0123456789abcdef-cluster"

// countingHealth counts the calls that reached the service.
type countingHealth struct {
	healthpb.UnimplementedHealthServer
	calls atomic.Int64
}

func (h *countingHealth) Check(context.Context, *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	h.calls.Add(1)
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

// serveCounting runs countingHealth behind the server options of a
// cluster with testSecret and returns its address.
func serveCounting(t *testing.T) (string, *countingHealth) {
	t.Helper()
	opts, err := ServerOptions(config.Cluster{Secret: testSecret}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	h := &countingHealth{}
	healthpb.RegisterHealthServer(srv, h)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(srv.Stop)
	return ln.Addr().String(), h
}

// TestRefusedBeforeTheMessageIsRead: on main the secret was checked by
// interceptors, which grpc-go runs only once the whole request message is
// read, so a caller without the secret could announce a 4 MiB message per
// stream and make the server wait for (and buffer) it. Now the call is
// refused when its headers arrive: a raw HTTP/2 client that sends only the
// message's 5-byte prefix, announcing 4 MiB, gets Unauthenticated at once
// and the service never runs.
func TestRefusedBeforeTheMessageIsRead(t *testing.T) {
	addr, h := serveCounting(t)
	tests := []struct {
		name   string
		secret string // "" sends none
	}{
		{"no secret", ""},
		{"wrong secret", "0123456789abcdef-wrong!!"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(wait))
			if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
				t.Fatal(err)
			}
			fr := http2.NewFramer(conn, conn)
			fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
			if err := fr.WriteSettings(); err != nil {
				t.Fatal(err)
			}
			var block bytes.Buffer
			enc := hpack.NewEncoder(&block)
			fields := [][2]string{
				{":method", "POST"}, {":scheme", "http"}, {":path", "/grpc.health.v1.Health/Check"},
				{":authority", addr}, {"content-type", "application/grpc"}, {"te", "trailers"},
			}
			if tt.secret != "" {
				fields = append(fields, [2]string{MetadataKey, tt.secret})
			}
			for _, f := range fields {
				if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
					t.Fatal(err)
				}
			}
			if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
				t.Fatal(err)
			}
			// The gRPC message prefix: not compressed, 4 MiB follow. They
			// never do.
			prefix := make([]byte, 5)
			binary.BigEndian.PutUint32(prefix[1:], 4<<20)
			if err := fr.WriteData(1, false, prefix); err != nil {
				t.Fatal(err)
			}
			for {
				f, err := fr.ReadFrame()
				if err != nil {
					t.Fatalf("no answer to the call while its message was unread (main waited for all 4 MiB): %v", err)
				}
				mh, ok := f.(*http2.MetaHeadersFrame)
				if !ok || mh.StreamID != 1 {
					continue
				}
				if got := mh.PseudoValue("status"); got != "" && got != "200" {
					t.Fatalf(":status %s", got)
				}
				code := field(mh, "grpc-status")
				if code == "" {
					continue // response headers; the status comes in trailers
				}
				if code != "16" { // Unauthenticated
					t.Fatalf("grpc-status %s (%s), want 16", code, field(mh, "grpc-message"))
				}
				if !strings.Contains(field(mh, "grpc-message"), "cluster.secret") {
					t.Errorf("grpc-message %q does not name cluster.secret", field(mh, "grpc-message"))
				}
				break
			}
			if n := h.calls.Load(); n != 0 {
				t.Fatalf("the service ran %d times for refused calls", n)
			}
		})
	}
}

// TestMessageSizeLimit: a caller with the secret may send messages up to
// MaxMessageBytes (grpc-go's default cut them at 4 MiB, less than a node's
// report of its rooms may need) and no larger.
func TestMessageSizeLimit(t *testing.T) {
	addr, h := serveCounting(t)
	opts, err := DialOptions(config.Cluster{Secret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	tests := []struct {
		name  string
		bytes int // of the service name; the message adds up to 5 bytes
		want  codes.Code
	}{
		{"small", 10, codes.OK},
		{"largest legitimate", MaxMessageBytes - 16, codes.OK},
		{"one byte too many", MaxMessageBytes, codes.ResourceExhausted},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := h.calls.Load()
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: strings.Repeat("r", tt.bytes)})
			if got := status.Code(err); got != tt.want {
				t.Fatalf("Check with %d bytes: %v, want %v", tt.bytes, err, tt.want)
			}
			ran := h.calls.Load() - before
			if (tt.want == codes.OK) != (ran == 1) {
				t.Fatalf("the service ran %d times", ran)
			}
		})
	}
}

// TestHandshakeTimeout: a connection that sends the HTTP/2 preface and
// nothing more is closed within connectionTimeout; on main grpc-go's 120 s
// default held it (2000 such connections stayed open 70 s and more).
func TestHandshakeTimeout(t *testing.T) {
	addr, _ := serveCounting(t)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_ = conn.SetReadDeadline(start.Add(connectionTimeout + wait))
	_, err = io.Copy(io.Discard, conn)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the connection was still open after %s", time.Since(start).Round(time.Second))
	}
	if took := time.Since(start); took < connectionTimeout/2 {
		t.Fatalf("closed after %s, before connectionTimeout (%s): for another reason?", took, connectionTimeout)
	}
}

// field is the value of the regular header name in mh, or "".
func field(mh *http2.MetaHeadersFrame, name string) string {
	for _, f := range mh.RegularFields() {
		if f.Name == name {
			return f.Value
		}
	}
	return ""
}
