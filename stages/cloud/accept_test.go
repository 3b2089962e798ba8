package cloud

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"imcloud/pipeline/config"
	"imcloud/pipeline/logtest"
	"imcloud/proto/client"
)

// flakyListener fails its first accepts with err, as a listener out of
// descriptors or kernel memory does, then accepts for real.
type flakyListener struct {
	net.Listener
	err   error
	left  atomic.Int32 // failures still to give
	calls atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	l.calls.Add(1)
	if l.left.Add(-1) >= 0 {
		return nil, l.err
	}
	return l.Listener.Accept()
}

// A failed accept (descriptors or kernel memory exhausted, a connection
// aborted in the backlog, a timeout) is retried with backoff and logged
// once per burst, on TCP and WebSocket: the node keeps serving, and the
// next client gets in. On main 4773376 ServeTCP returned at the first
// EMFILE and the node stopped every stage; net/http gave up on ENOBUFS
// and ENOMEM.
func TestAcceptErrorsAreRetried(t *testing.T) {
	const failures = 5
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM, syscall.ECONNABORTED, syscall.ETIMEDOUT} {
		for _, transport := range []string{"tcp", "ws"} {
			t.Run(errno.Error()+"/"+transport, func(t *testing.T) {
				n := startNode(t, func(*config.Cloud) {})
				inner, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				flaky := &flakyListener{Listener: inner, err: &net.OpError{Op: "accept", Net: "tcp", Addr: inner.Addr(), Err: os.NewSyscallError("accept4", errno)}}
				flaky.left.Store(failures)
				served := make(chan error, 1)
				target := inner.Addr().String()
				if transport == "tcp" {
					go func() { served <- n.st.ServeTCP(flaky) }()
				} else {
					srv := &http.Server{Handler: n.st.WSHandler(), ReadHeaderTimeout: wait}
					go func() { served <- srv.Serve(n.st.Listener(flaky)) }()
					defer srv.Close()
					target = "ws://" + target + "/sub"
				}

				c := authenticate(t, target, claims{Mid: 1})
				_ = c.Close()
				if got := flaky.calls.Load(); got <= failures {
					t.Fatalf("%d accepts, want more than the %d failures", got, failures)
				}
				select {
				case err := <-served:
					t.Fatalf("serving ended: %v", err)
				default:
				}
				_ = inner.Close()
				if err := <-served; err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
					t.Fatalf("serving ended with %v after the listener closed", err)
				}
			})
		}
	}
}

// A burst of failed accepts is logged once when it starts and once when
// accepting recovers, however long it lasts.
func TestAcceptBurstLoggedOnce(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	const failures = 5
	flaky := &flakyListener{Listener: inner, err: &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}}
	for burst := range 2 {
		flaky.left.Store(failures)
		var logs logtest.Buffer
		ln := &retryListener{Listener: flaky, logger: slog.New(slog.NewTextHandler(&logs, nil))}
		accepted := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if err == nil {
				_ = c.Close()
			}
			accepted <- err
		}()
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if err := <-accepted; err != nil {
			t.Fatalf("burst %d: accept: %v", burst, err)
		}
		_ = c.Close()
		out := logs.String()
		if w, i := strings.Count(out, "accepting client connections failed"), strings.Count(out, "accepting client connections again"); w != 1 || i != 1 || !strings.Contains(out, "failed_accepts=5") {
			t.Fatalf("burst %d of %d failures logged %d warnings and %d recoveries, want 1 and 1 counting them:\n%s", burst, failures, w, i, out)
		}
	}
}

// authenticate dials target and authenticates within a few seconds.
func authenticate(t *testing.T, target string, cl claims) *client.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, target, client.Options{})
	if err != nil {
		t.Fatalf("dial after failed accepts: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	tok, _ := json.Marshal(cl)
	if _, err := c.Auth(tok); err != nil {
		_ = c.Close()
		t.Fatalf("auth after failed accepts: %v", err)
	}
	return c
}
