// What only the CUDA kernels do with families.h, checked on the host (tests/test_native.py
// builds and runs this): a slice's mirror pairs split over `lanes` threads (first = lane,
// step = lanes) visit every element exactly once at its grid point, the lanes' kernels together
// are the one-lane kernel, and the AKP gradients finished per lane and summed are the one-lane
// gradient (float64). Prints each failure; exit status 1 if there was one.
#include <cmath>
#include <cstdio>
#include <vector>

#include "families.h"

using acl_fused::kAkpSlots;

int main() {
  const double p[kAkpSlots] = {0.7, 0.4, -0.3, 0.2, 0.5, 1.1};
  int failures = 0;
  const auto fail = [&](const char* what, int code, int kh, int kw, int lanes) {
    std::printf("%s: family %d, kernel %dx%d, %d lanes\n", what, code, kh, kw, lanes);
    ++failures;
  };
  for (int kh = 1; kh <= 8; ++kh) {
    for (int kw = 1; kw <= 8; ++kw) {
      const int kk = kh * kw;
      std::vector<double> g(kk), whole_w(kk);
      for (int e = 0; e < kk; ++e) g[e] = std::sin(1.3 * e + 0.2);
      for (int lanes = 1; lanes <= 32; lanes *= 2) {
        std::vector<int> seen(kk, 0);
        bool at_grid_points = true;
        for (int lane = 0; lane < lanes; ++lane) {
          acl_fused::for_each_pair<double>(kh, kw, lane, lanes, [&](int e, int mirror, double x, double y) {
            ++seen[e];
            if (mirror != e) ++seen[mirror];
            at_grid_points = at_grid_points && x == e % kw - (kw - 1) / 2.0 && y == e / kw - (kh - 1) / 2.0 &&
                             -x == mirror % kw - (kw - 1) / 2.0 && -y == mirror / kw - (kh - 1) / 2.0;
          });
        }
        for (int e = 0; e < kk; ++e) {
          if (seen[e] != 1) fail("an element not visited exactly once", 0, kh, kw, lanes);
        }
        if (!at_grid_points) fail("a pair away from its grid points", 0, kh, kw, lanes);
        for (int code = 1; code < acl_fused::kNumFamilies; ++code) {
          double whole[kAkpSlots], sum[kAkpSlots] = {};
          acl_fused::akp_grad_slice<double>(code, p, kh, kw, 0, 1, g.data(), whole);
          acl_fused::synthesize_slice<double>(code, p, kh, kw, 0, 1, whole_w.data());
          std::vector<double> w(kk, std::nan(""));
          for (int lane = 0; lane < lanes; ++lane) {
            double part[kAkpSlots];
            acl_fused::akp_grad_slice<double>(code, p, kh, kw, lane, lanes, g.data(), part);
            for (int k = 0; k < kAkpSlots; ++k) sum[k] += part[k];
            acl_fused::synthesize_slice<double>(code, p, kh, kw, lane, lanes, w.data());
          }
          for (int k = 0; k < kAkpSlots; ++k) {
            if (!(std::fabs(sum[k] - whole[k]) <= 1e-12 * (1 + std::fabs(whole[k])))) {
              fail("lanes' AKP gradients do not add up", code, kh, kw, lanes);
            }
          }
          for (int e = 0; e < kk; ++e) {
            if (!(w[e] == whole_w[e])) fail("lanes' kernel differs", code, kh, kw, lanes);
          }
        }
      }
    }
  }
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
